"""Megatron-LM flags that megallama accepts without implementing: ignored, or refused in one line.

Megatron's example launch scripts pass flags that either change nothing here (a kernel choice, a
behaviour megallama always has, a logging toggle for a value it always logs) or ask for something
megallama does not do (fp8, fp16, GPT-2 BPE, context parallelism). Each one below parses with
Megatron's value type, so a script's argv is read in full; ``check_megatron_compatibility_flags``
then stops a run that asks for something megallama cannot give, with one line saying why, instead
of argparse's "unrecognized arguments" or a silent difference.

Flags megallama defines itself or honours with Megatron's meaning are not here (see
``tests/fixtures/megatron_flags/DISPOSITION.md`` for every flag of the example scripts).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

# A predicate over (given value, whole namespace): True when that value is fine here.
AllowedValue = Callable[[Any, argparse.Namespace], bool]


@dataclass(frozen=True)
class MegatronFlag:
    """One Megatron flag megallama parses but does not implement.

    ``argparse_kwargs`` give Megatron's value type (``store_true``, ``type``, ``choices``, ``nargs``)
    with ``default=None`` for valued flags, so "given" can be told from "not given". A given flag is
    ignored (``ignored`` says why) when ``allowed`` accepts its value, else refused with ``refused``
    (may name ``{value}``). No ``allowed`` means: always ignored if ``ignored`` is set, always
    refused if only ``refused`` is set.
    """

    name: str
    argparse_kwargs: dict = field(default_factory=dict)
    ignored: Optional[str] = None
    refused: Optional[str] = None
    allowed: Optional[AllowedValue] = None

    @property
    def dest(self) -> str:
        return self.argparse_kwargs.get("dest", self.name.lstrip("-").replace("-", "_"))

    def given(self, namespace: argparse.Namespace) -> bool:
        value = getattr(namespace, self.dest, None)
        return value is not None and value is not False

    def refusal(self, namespace: argparse.Namespace) -> Optional[str]:
        """The one-line error for this flag as given in ``namespace``, or None if it may stay."""
        if not self.given(namespace) or self.refused is None:
            return None
        value = getattr(namespace, self.dest)
        if self.allowed is not None and self.allowed(value, namespace):
            return None
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        return self.refused.format(value=shown)


def _equals(expected) -> AllowedValue:
    return lambda value, namespace: value == expected


# Value-less flags, Megatron's store_true and store_false (--no-...) alike: store_true here only
# records that the flag was given.
GIVEN = {"action": "store_true"}

MEGATRON_FLAGS: tuple[MegatronFlag, ...] = (
    # --- model: implementation choices and LLaMA facts ------------------------------------------
    MegatronFlag("--transformer-impl", {"choices": ["local", "transformer_engine"], "default": None},
                 ignored="megallama uses its own layers, neither Transformer Engine's nor Megatron's local ones"),
    MegatronFlag("--apply-layernorm-1p", GIVEN,
                 ignored="storing the norm weight as 1 + w changes only its parametrisation: norm weights get "
                 "no weight decay, so training is the same up to rounding"),
    # --- precision ------------------------------------------------------------------------------
    MegatronFlag("--fp16", GIVEN,
                 refused="--fp16: megallama trains in bf16 (--bf16) or fp32 and has no fp16 loss scaling; "
                 "use --bf16"),
    MegatronFlag("--fp8-format", {"choices": ["e4m3", "hybrid"], "default": None},
                 refused="--fp8-format needs NVIDIA Transformer Engine, which megallama does not use; "
                 "use --bf16"),
    MegatronFlag("--fp8-param-gather", GIVEN,
                 refused="--fp8-param-gather needs --fp8-format (NVIDIA Transformer Engine), which megallama "
                 "does not use"),
    MegatronFlag("--fp8-amax-history-len", {"type": int, "default": None},
                 ignored="fp8 scaling setting, read only with --fp8-format (which megallama refuses)"),
    MegatronFlag("--fp8-amax-compute-algo", {"choices": ["most_recent", "max"], "default": None},
                 ignored="fp8 scaling setting, read only with --fp8-format (which megallama refuses)"),
    MegatronFlag("--accumulate-allreduce-grads-in-fp32", GIVEN,
                 ignored="megallama always accumulates gradients in fp32 (DDP's main_grad) and reduces them in fp32, "
                 "which is what the flag asks for"),
    MegatronFlag("--grad-reduce-in-bf16", GIVEN,
                 ignored="megallama always accumulates and reduces gradients in fp32 (more precise, twice "
                 "the reduce traffic)"),
    # --- distributed and memory -----------------------------------------------------------------
    MegatronFlag("--context-parallel-size", {"type": int, "default": None},
                 ignored="1 means no context parallelism",
                 refused="--context-parallel-size {value}: megallama has no context parallelism; it must be 1 "
                 "(use --sequence-parallel with tensor parallelism for long sequences)",
                 allowed=_equals(1)),
    MegatronFlag("--empty-unused-memory-level", {"type": int, "choices": [0, 1, 2], "default": None},
                 ignored="emptying the CUDA cache only fights fragmentation; it does not change training"),
    # --- data -----------------------------------------------------------------------------------
    MegatronFlag("--vocab-file", {"type": str, "default": None},
                 refused="--vocab-file: megallama has no GPT-2 BPE tokenizer; give a SentencePiece model or a "
                 "Hugging Face tokenizer folder with --tokenizer-model (or --tokenizer-type NullTokenizer)"),
    MegatronFlag("--merge-file", {"type": str, "default": None},
                 refused="--merge-file: megallama has no GPT-2 BPE tokenizer; give a SentencePiece model or a "
                 "Hugging Face tokenizer folder with --tokenizer-model (or --tokenizer-type NullTokenizer)"),
    MegatronFlag("--tiktoken-pattern", {"type": str, "default": None},
                 ignored="read only by Megatron's TikTokenizer, which megallama does not offer"),
    MegatronFlag("--no-create-attention-mask-in-dataloader", GIVEN,
                 ignored="megallama never builds an attention-mask tensor: causality and document bounds come "
                 "from the attention kernel and position ids"),
    MegatronFlag("--no-mmap-bin-files", GIVEN,
                 ignored="megallama always memory-maps the .bin files; the data read is the same"),
    # --- logging and checkpoints ----------------------------------------------------------------
    MegatronFlag("--log-num-zeros-in-grad", GIVEN,
                 ignored="megallama does not count zero gradient entries (no `num zeros` in its log); training is "
                 "the same"),
    MegatronFlag("--timing-log-level", {"type": int, "choices": [0, 1, 2], "default": None},
                 ignored="megallama's timers are fixed: the iteration time always, the phase times with "
                 "--log-timers-to-tensorboard, none of them waiting for the device"),
    MegatronFlag("--tensorboard-log-interval", {"type": int, "default": None},
                 ignored="megallama writes TensorBoard scalars at each --log-interval report (the iterations that "
                 "read their values from the device); set --log-interval for their spacing"),
    MegatronFlag("--use-checkpoint-args", GIVEN,
                 ignored="megallama takes the model from its flags and checks it against the one the checkpoint "
                 "records, stopping in one line where they differ"),
    MegatronFlag("--ckpt-format",
                 {"choices": ["torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"], "default": None},
                 ignored="megallama's own checkpoints reload under any parallel layout, as torch_dist ones do "
                 "(they are not Megatron's files)",
                 refused="--ckpt-format {value}: megallama writes only its own checkpoint format (reloadable under "
                 "any parallel layout, like torch_dist); drop --ckpt-format or give torch_dist",
                 allowed=_equals("torch_dist")),
)


def _help(flag: MegatronFlag) -> str:
    refused = flag.refused.split(": ", 1)[-1].rstrip(".") if flag.refused else None
    if flag.ignored and refused:
        text = f"Megatron flag, accepted only where it changes nothing ({flag.ignored}); otherwise refused: {refused}."
    elif flag.ignored:
        text = f"Megatron flag, ignored here: {flag.ignored}."
    else:
        text = f"Megatron flag, refused here: {refused}."
    return text.replace("%", "%%")  # argparse formats help with %


def add_megatron_compatibility_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every flag of ``MEGATRON_FLAGS`` the parser does not define already (its own definition wins)."""
    group = parser.add_argument_group(
        "Megatron-LM flags megallama does not implement (parsed so launch scripts carry over; "
        "ignored when they change nothing here, else refused)")
    defined = set(parser._option_string_actions)
    for flag in MEGATRON_FLAGS:
        if flag.name not in defined:
            group.add_argument(flag.name, help=_help(flag), **flag.argparse_kwargs)
    return parser


def check_megatron_compatibility_flags(namespace: argparse.Namespace,
                                       flags: Sequence[MegatronFlag] = MEGATRON_FLAGS,
                                       error: type[Exception] = ValueError) -> None:
    """Raise ``error`` with one line for the first given flag megallama refuses.

    ``megallama.training.arguments`` passes its ``ConfigError`` (this module must not import it: the
    import graph stays acyclic once arguments imports this module).
    """
    for flag in flags:
        message = flag.refusal(namespace)
        if message is not None:
            raise error(message)


def ignored_megatron_flags(namespace: argparse.Namespace,
                           flags: Sequence[MegatronFlag] = MEGATRON_FLAGS) -> list[str]:
    """``"--flag: why"`` for each given flag that is accepted and ignored, for the launcher to log once."""
    return [f"{flag.name}: {flag.ignored}" for flag in flags
            if flag.given(namespace) and flag.ignored and flag.refusal(namespace) is None]
