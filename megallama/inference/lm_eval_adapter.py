"""A ``megallama`` model for lm-evaluation-harness (``pip install megallama[eval]``).

    python tools/run_lm_eval.py --model megallama --model_args load=CKPT,tokenizer_model=tok.model \\
        --tasks mmlu --num_fewshot 5
    torchrun --nproc-per-node 2 tools/run_lm_eval.py --model megallama --model_args load=CKPT ...  # TP=2

``load`` is a checkpoint of any format and layout (megallama save folder, HF or Meta folder);
``tokenizer_model`` defaults to the ``tokenizer.model`` stored with it. Under torchrun every process
is a tensor-parallel rank of one model and runs every request (lm-eval sees one rank). Task logic,
few-shot sampling, metrics and stop sequences are lm-eval's; this class only scores and generates.
Tokenization follows lm-eval's ``hf`` model on the HF export (BOS before every encoded text, as
that tokenizer adds it), so both give the same requests and the same log-likelihoods.

Importing this module registers the model; ``tools/run_lm_eval.py`` is lm-eval's CLI with it imported
(lm-eval 0.4 discovers models only from its own table or by import).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from megallama.checkpoint import load_matching_tokenizer, load_model
from megallama.checkpoint.storage import CheckpointError
from megallama.inference.generation import SamplingParams, generate, prepare_for_inference
from megallama.inference.runtime import init_tensor_parallel_from_env, is_rank0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What lm-eval itself adds to --model_args for every model (simple_evaluate passes batch_size,
# max_batch_size and device; --trust_remote_code adds trust_remote_code). The device is the one
# torchrun and CUDA give (init_tensor_parallel_from_env); the others mean nothing here.
LM_EVAL_MODEL_ARGS = ("max_batch_size", "device", "trust_remote_code")


class ModelArgsError(ValueError):
    """A ``--model_args`` value megallama cannot run with (``tools/run_lm_eval.py`` prints it in one line)."""


@register_model("megallama")
class MegallamaLM(TemplateLM):
    def __init__(self, load: str, tokenizer_model: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, dtype: str = "float32", **lm_eval_args):
        super().__init__()
        unknown = sorted(set(lm_eval_args) - set(LM_EVAL_MODEL_ARGS))
        if unknown:  # a misspelt argument would otherwise run with its default, e.g. no tokenizer
            accepted = [name for name in inspect.signature(MegallamaLM.__init__).parameters
                        if name not in ("self", "lm_eval_args")]
            raise ModelArgsError(f"unknown megallama model_args {', '.join(unknown)}; it takes "
                                 f"{', '.join(accepted)} (and lm-eval's own {', '.join(LM_EVAL_MODEL_ARGS)})")
        if dtype not in DTYPES:
            raise ModelArgsError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        device = init_tensor_parallel_from_env()
        try:  # the checkpoint readers' and the tokenizer check's one-line messages
            model, reader = load_model(load, dtype=DTYPES[dtype], device=device)
            tokenizer_model = tokenizer_model or reader.tokenizer_model()
            if tokenizer_model is None:
                raise ValueError(f"{load} holds no tokenizer (tokenizer.model or tokenizer.json): pass "
                                 "tokenizer_model=PATH in --model_args")
            self.tokenizer = load_matching_tokenizer(model.config, tokenizer_model)
        except (OSError, ValueError, CheckpointError) as error:
            raise ModelArgsError(str(error)) from None
        self.model = prepare_for_inference(model)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)  # lm-eval's auto, auto:N
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        if self._max_length > self.model.config.max_position_embeddings:  # else a long request fails mid-run
            raise ModelArgsError(f"max_length={self._max_length} exceeds the model's max_position_embeddings "
                                 f"({self.model.config.max_position_embeddings})")
        self.max_gen_toks = int(max_gen_toks)
        self._device = device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.tokenizer.bos_id] + ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
        request, the input cut to the last ``max_length`` tokens as lm-eval's ``hf`` model does."""
        results = []
        size = override_bs or self.batch_size
        bar = tqdm(total=len(requests), disable=disable_tqdm or not is_rank0(), desc="loglikelihood")
        for start in range(0, len(requests), size):
            batch = requests[start:start + size]
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
            longest = max(len(x) for x in inputs)
            padded = torch.full((len(batch), longest), self.tokenizer.pad_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                padded[row, :len(ids)] = torch.tensor(ids)  # right padding: causal rows are unaffected
            logprobs = F.log_softmax(self.model(padded.to(self._device)).float(), dim=-1)
            for row, (key, _, continuation) in enumerate(batch):
                n, end = len(continuation), len(inputs[row])
                scores = logprobs[row, end - n:end]
                target = torch.tensor(continuation, device=scores.device)
                answer = (float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` (lm-eval's windows)."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or not is_rank0(), desc="rolling"):
            windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations cut at the task's stop sequences."""
        out = []
        eos = self.tokenizer.decode([self.eot_token_id]) or None
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm or not is_rank0(),
                                        desc="generate_until"):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:  # as lm-eval's hf model asserts
                raise ValueError(f"max_gen_toks={max_new} leaves no context in max_length={self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            # normalize_gen_kwargs sets temperature 0 without do_sample; 0 is greedy in SamplingParams too
            sampling = SamplingParams(greedy=not kwargs.get("do_sample"),
                                      temperature=float(kwargs.get("temperature", 1.0)),
                                      top_p=float(kwargs.get("top_p", 1.0)))
            new = generate(self.model, [ids], max_new, sampling, eos_id=self.eot_token_id,
                           pad_id=self.tokenizer.pad_id, vocab_size=self.tokenizer.vocab_size)[0]
            text = postprocess_generated_text(generation=self.tok_decode(new), stop=until, think_end_token=None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
