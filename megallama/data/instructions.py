"""Instruction data → token ids and a per-token loss mask, through a chat template (llama2 or llama3).

Formats people download, each read as a conversation (an optional system prompt, then
user/assistant exchanges):

* ``alpaca``: ``{"instruction", "input" (optional), "output"}`` → user = instruction, a blank
  line and the input; assistant = output.
* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  an optional system turn first, then user and assistant alternating, ending with an assistant.
* ``flan``: ``{"inputs", "targets"}`` → one exchange.

The ``llama2`` template (Llama-2-chat's layout, with LLaMA's ``<s>``/``</s>`` ids) renders
exchange ``i`` as::

    <s> [INST] {system block, first exchange only}{user} [/INST] {assistant}</s>

with the system block ``<<SYS>>\\n{system}\\n<</SYS>>\\n\\n``. Contents are stripped of surrounding
whitespace. Ids are ``[bos] + encode("[INST] … [/INST]") + encode(assistant) + [eos]`` per exchange:
SentencePiece (split by whitespace) never merges across the space before the answer, and the
space after ``<s>`` in the Jinja form stands for the encoder's dummy prefix, so HF's
``apply_chat_template`` with :data:`CHAT_TEMPLATES` gives exactly these ids. The loss mask is 1 on
every assistant token and the ``</s>`` ending it, 0 on ``<s>``, prompt and system tokens.

The ``llama3`` template (LLaMA-3-instruct's layout, for a tokenizer with its special tokens, e.g. a
LLaMA-3 Hugging Face folder) renders the whole conversation as::

    <|begin_of_text|>{header(system) system<|eot_id|>, if any}
    header(user) {user}<|eot_id|>header(assistant) {assistant}<|eot_id|> …

with ``header(role)`` = ``<|start_header_id|>{role}<|end_header_id|>\n\n`` and contents stripped. As in
Meta's reference code, ids are the special tokens' ids, ``encode(role)``, ``encode("\n\n")`` and
``encode(content)``: LLaMA-3's pre-tokenizer splits newlines from the stripped content after them,
so HF's ``apply_chat_template`` with :data:`CHAT_TEMPLATES` gives exactly these ids. The loss mask is
1 on each assistant content and its ``<|eot_id|>``, 0 on headers, BOS, system and user turns.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megallama.data.indexed import IndexedDatasetWriter, optimal_dtype
from megallama.data.jsonl import BadLineError, expand_inputs, iter_line_batches
from megallama.data.workers import all_or_nothing, worker_results
from megallama.tokenizer import SentencePieceTokenizer

FORMATS = ("alpaca", "messages", "flan")
ROLES = ("system", "user", "assistant")

# The template as Jinja for HF tokenizer files (``chat_template``): the same text, tokenized by HF's
# LLaMA tokenizer (which splits at <s>/</s>), gives the ids of ``encode_conversation``.
LLAMA2_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set block = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if loop.first and system else '' -%}"
    "{{- bos_token + ' [INST] ' + block + (message['content'] | trim) + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + (message['content'] | trim) + eos_token -}}"
    "{%- else -%}{{- raise_exception('roles must be system (first), then user and assistant alternating') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Meta's LLaMA-3-instruct chat_template, with the roles checked as in LLAMA2_JINJA.
LLAMA3_JINJA = (
    "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set expected = 'system' if loop.index0 < offset else ['user', 'assistant'][(loop.index0 - offset) % 2] -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('roles must be system (first), then user and assistant alternating') -}}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
CHAT_TEMPLATES = {"llama2": LLAMA2_JINJA, "llama3": LLAMA3_JINJA}
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class InstructionError(ValueError):
    """A record that cannot be made into a conversation; the message is the reason counted."""


@dataclass
class Conversation:
    system: str
    exchanges: list  # [(user, assistant)], assistant None only for a prompt awaiting its answer


def _text(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        raise InstructionError(f"missing key {key!r}")
    if not isinstance(value, str):
        raise InstructionError(f"key {key!r} is not a string")
    value = value.strip()
    if not value and not optional:
        raise InstructionError(f"empty {key!r}")
    return value


def messages_to_conversation(messages, allow_open: bool = False) -> Conversation:
    """``[{"role", "content"}, ...]`` → a conversation; ``allow_open``: it may end with a user turn
    (a prompt to answer)."""
    if not isinstance(messages, list) or not messages:
        raise InstructionError("'messages' is not a non-empty list")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InstructionError(f"a message needs a role of {'/'.join(ROLES)}")
        turns.append((m["role"], _text(m, "content")))
    system = turns.pop(0)[1] if turns[0][0] == "system" else ""
    expected = ["user", "assistant"] * ((len(turns) + 1) // 2)
    if [r for r, _ in turns] != expected[:len(turns)] or not turns:
        raise InstructionError("roles must be system (first), then user and assistant alternating")
    if turns[-1][0] == "user" and not allow_open:
        raise InstructionError("the conversation ends without an assistant turn")
    contents = [c for _, c in turns] + ([None] if turns[-1][0] == "user" else [])
    return Conversation(system, list(zip(contents[0::2], contents[1::2])))


def record_to_conversation(record, fmt: str) -> Conversation:
    """One JSON record of format ``fmt`` → a conversation; ``InstructionError`` names what is wrong."""
    if not isinstance(record, dict):
        raise InstructionError("not a JSON object")
    if fmt == "alpaca":
        user = _text(record, "instruction")
        extra = _text(record, "input", optional=True)
        return Conversation("", [(user + "\n\n" + extra if extra else user, _text(record, "output"))])
    if fmt == "flan":
        return Conversation("", [(_text(record, "inputs"), _text(record, "targets"))])
    if fmt == "messages":
        return messages_to_conversation(record.get("messages"))
    raise ValueError(f"unknown instruction format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _prompt_text(conversation: Conversation, i: int, user: str) -> str:
    system = conversation.system if i == 0 else ""
    block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    return f"[INST] {block}{user} [/INST]"


def special_token_id(tokenizer, token: str) -> int:
    """The id of special token ``token`` in a SentencePiece or Hugging Face tokenizer; a one-line
    ``ValueError`` naming it when the vocabulary lacks it."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        token_id = tokenizer.sp.piece_to_id(token)  # the unknown id when absent
        found = tokenizer.sp.id_to_piece(token_id) == token
    else:
        token_id = tokenizer.tokenizer.token_to_id(token)
        found = token_id is not None
    if not found:
        raise ValueError(f"the llama3 template needs the special token {token}, which the tokenizer lacks")
    return token_id


def check_template_tokens(tokenizer, template: str) -> None:
    """Raise the ``ValueError`` of :func:`special_token_id` for a special token ``template`` needs
    and the tokenizer lacks (before any record is read)."""
    if template == "llama3":
        for token in LLAMA3_TOKENS:
            special_token_id(tokenizer, token)


def default_chat_template(tokenizer) -> str:
    """``llama3`` for a tokenizer holding LLaMA-3's chat tokens (``<|start_header_id|>``,
    ``<|end_header_id|>``, ``<|eot_id|>``), else ``llama2``."""
    try:
        check_template_tokens(tokenizer, "llama3")
    except ValueError:
        return "llama2"
    return "llama3"


def _encode_llama2(tokenizer, conversation: Conversation) -> tuple[list, list]:
    ids, mask = [], []
    for i, (user, answer) in enumerate(conversation.exchanges):
        prompt = [tokenizer.bos_id] + tokenizer.encode(_prompt_text(conversation, i, user))
        ids += prompt
        mask += [0] * len(prompt)
        if answer is not None:
            reply = tokenizer.encode(answer) + [tokenizer.eos_id]
            ids += reply
            mask += [1] * len(reply)
    return ids, mask


def _encode_llama3(tokenizer, conversation: Conversation) -> tuple[list, list]:
    start_header, end_header, eot = (special_token_id(tokenizer, t) for t in LLAMA3_TOKENS)
    blank_line = tokenizer.encode("\n\n")

    def header(role: str) -> list[int]:
        return [start_header] + tokenizer.encode(role) + [end_header] + blank_line

    def untrained_turn(role: str, content: str) -> list[int]:
        return header(role) + tokenizer.encode(content) + [eot]

    ids = [tokenizer.bos_id] + (untrained_turn("system", conversation.system) if conversation.system else [])
    mask = [0] * len(ids)
    for user, answer in conversation.exchanges:
        prompt = untrained_turn("user", user) + header("assistant")
        ids += prompt
        mask += [0] * len(prompt)
        if answer is not None:
            reply = tokenizer.encode(answer) + [eot]
            ids += reply
            mask += [1] * len(reply)
    return ids, mask


def encode_conversation(tokenizer, conversation: Conversation, template: str = "llama2"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids, uint8 loss mask) of ``conversation`` under ``template``. An exchange whose
    answer is None (the last) ends with the prompt: what generation continues from."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    encode = _encode_llama3 if template == "llama3" else _encode_llama2
    ids, mask = encode(tokenizer, conversation)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def encode_chat_prompt(tokenizer, messages, template: str = "llama2") -> list[int]:
    """Ids of a chat ending with a user turn, ready for the assistant's answer (HF's
    ``apply_chat_template(messages, add_generation_prompt=True)``)."""
    conversation = messages_to_conversation(messages, allow_open=True)
    if conversation.exchanges[-1][1] is not None:
        raise InstructionError("a chat prompt must end with a user turn")
    return encode_conversation(tokenizer, conversation, template)[0].tolist()


def parse_record_line(raw: bytes, fmt: str) -> Conversation:
    """A JSONL line → conversation (``InstructionError`` for blank, undecodable or bad lines)."""
    if not raw.strip():
        raise InstructionError("blank line")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InstructionError("invalid UTF-8") from None
    except ValueError:
        raise InstructionError("broken JSON") from None
    return record_to_conversation(record, fmt)


# --- preprocessing: JSONL files → PREFIX_text_document + PREFIX_loss_mask_document ---------------

def output_prefixes(output_prefix: str) -> tuple[str, str]:
    """(tokens, loss mask) dataset prefixes written for ``--output-prefix``."""
    return f"{output_prefix}_text_document", f"{output_prefix}_loss_mask_document"


@dataclass
class InstructionSummary:
    conversations: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    outputs: tuple = ()


_worker_state: dict = {}


def _init_worker(tokenizer, fmt: str, template: str, strict: bool) -> None:
    _worker_state.update(tokenizer=tokenizer, fmt=fmt, template=template, strict=strict)


def _encode_lines(task):
    path, first, lines = task
    s = _worker_state
    encoded, skipped = [], Counter()
    for offset, raw in enumerate(lines):
        try:
            conversation = parse_record_line(raw, s["fmt"])
        except InstructionError as error:
            if s["strict"]:
                raise BadLineError(f"{path}:{first + offset}: {error}") from None
            skipped[str(error)] += 1
            continue
        encoded.append(encode_conversation(s["tokenizer"], conversation, s["template"]))
    return encoded, skipped


def preprocess_instructions(inputs, output_prefix: str, fmt: str, tokenizer_model: str,
                            template: str = "llama2", workers: int = 1, strict: bool = False,
                            progress: bool = True, batch_lines: int = 256,
                            tokenizer_type: str | None = None) -> InstructionSummary:
    """Tokenize every usable record of ``inputs`` (JSONL, .gz/.zst too) into two indexed datasets
    with the same document boundaries: the ids (one document per conversation) and the loss mask
    (uint8). Bad records are counted by reason (``strict``: the first one raises ``BadLineError``).
    ``tokenizer_model`` is a SentencePiece .model or a Hugging Face tokenizer folder, told apart by
    the path unless ``tokenizer_type`` says."""
    from megallama.tokenizer import load_tokenizer

    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown --template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    check_template_tokens(tokenizer, template)
    summary = InstructionSummary(outputs=output_prefixes(output_prefix))
    tokens_out = IndexedDatasetWriter(summary.outputs[0], optimal_dtype(tokenizer.vocab_size))
    mask_out = IndexedDatasetWriter(summary.outputs[1], np.uint8)
    tasks = iter_line_batches(paths, batch_lines)
    bar = tqdm(desc="preprocess instructions", unit=" conversations", disable=not progress, mininterval=1.0)
    start = time.perf_counter()
    with bar, all_or_nothing([tokens_out, mask_out]), \
            worker_results(_encode_lines, tasks, workers, _init_worker, (tokenizer, fmt, template, strict)) as results:
        for encoded, skipped in results:
            for ids, mask in encoded:
                tokens_out.add_document(ids)
                mask_out.add_document(mask)
                summary.tokens += int(ids.size)
                summary.answer_tokens += int(mask.sum())
            summary.conversations += len(encoded)
            summary.skipped.update(skipped)
            bar.update(len(encoded))
        if summary.conversations == 0:
            raise ValueError(f"no usable {fmt!r} record in {', '.join(paths)} "
                             f"(skipped: {', '.join(f'{n} {r}' for r, n in summary.skipped.most_common())})")
    summary.seconds = time.perf_counter() - start
    return summary


def format_instruction_summary(summary: InstructionSummary) -> str:
    skipped = sum(summary.skipped.values())
    lines = [f"wrote {summary.conversations:,} conversations, {summary.tokens:,} tokens "
             f"({summary.answer_tokens:,} in answers, trained on) to "
             + ", ".join(p + ".{bin,idx}" for p in summary.outputs) + f" in {summary.seconds:.1f} s",
             f"skipped {skipped:,} records" + (":" if skipped else "")]
    lines += [f"  {n:,} {reason}" for reason, n in summary.skipped.most_common()]
    return "\n".join(lines)
