"""megallama: the LLaMA pretraining recipe as a Megatron-style codebase."""

__version__ = "0.1.0"
