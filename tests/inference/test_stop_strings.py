"""Stop strings: generation ends where the decoded continuation holds one, whose text is cut before
it (lm-eval's ``until``, vLLM's ``stop``); streamed text never runs past it."""
import pytest
import torch

from megallama.checkpoint import convert_checkpoint, load_model
from megallama.inference import prepare_for_inference
from megallama.inference.text import IncrementalDecoder, first_stop, generate_text
from megallama.tokenizer import SentencePieceTokenizer
from tests.inference.conftest import load_tool, random_hf_model, tiny_config

PROMPT = "birds flying over 45 green"


class CharTokenizer:
    """One character a token (the id is its code point): decoding is exact, so only the decoder is tested."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def _stream(decoder: IncrementalDecoder, text: str) -> list[str]:
    deltas = []
    for char in text:
        deltas.append(decoder.add(ord(char)))
        if decoder.stopped:
            break
    return deltas


def test_first_stop_is_the_earliest_stop_string():
    assert first_stop("a b\n\nc", ["\n\n", "b"]) == 2
    assert first_stop("abc", ["x"]) is None
    assert first_stop("abc", []) is None


def test_streamed_text_never_runs_past_a_stop_string():
    decoder = IncrementalDecoder(CharTokenizer(), [ord(">")], ["END", "!"])
    deltas = _stream(decoder, "abENxyEND tail")
    assert decoder.stopped
    assert "".join(deltas) + decoder.flush() == decoder.text() == "abENxy"
    assert "".join(deltas[:4]) == "ab"  # "EN" may begin "END": held back until it cannot
    unstopped = IncrementalDecoder(CharTokenizer(), [ord(">")], ["END"])
    assert "".join(_stream(unstopped, "abEN")) == "ab" and not unstopped.stopped
    assert unstopped.flush() == "EN"  # generation ended: what was held back comes out
    with pytest.raises(ValueError, match="must not be empty"):
        IncrementalDecoder(CharTokenizer(), [], [""])


@pytest.fixture(scope="module")
def wordy(tmp_path_factory, sp_model):
    """An HF checkpoint with its tokenizer whose byte-fallback pieces are never chosen: its text is
    ASCII words, the same whether decoded whole or token by token."""
    raw, folder = str(tmp_path_factory.mktemp("wordy_raw")), str(tmp_path_factory.mktemp("wordy"))
    hf = random_hf_model(tiny_config())
    with torch.no_grad():
        hf.lm_head.weight[3:259] = 0.0
    hf.save_pretrained(raw)
    convert_checkpoint(raw, folder, "hf", tokenizer_model=sp_model, progress=False)
    model = prepare_for_inference(load_model(folder)[0])
    tokenizer = SentencePieceTokenizer(sp_model)
    free = generate_text(model, tokenizer, [PROMPT], 24)[0]
    assert free.isascii() and len(free) > 12, free
    stop = free[len(free) // 2:len(free) // 2 + 2]
    return folder, model, tokenizer, stop, free[:free.index(stop)]


def test_generation_ends_at_a_stop_string_and_cuts_it_off(wordy):
    _, model, tokenizer, stop, want = wordy
    streamed, steps = {0: "", 1: ""}, []

    def on_text(row, text):
        streamed[row] += text
    got = generate_text(model, tokenizer, [PROMPT, PROMPT], 24, on_text=on_text, on_step=steps.append,
                        stop_strings=["never there", stop])
    assert got == [want, want] and streamed == {0: want, 1: want}
    assert len(steps) < 24  # it ended at the stop string, not after max_new_tokens


def test_generate_tool_stops_at_stop_strings(wordy, capsys):
    folder, _, _, stop, want = wordy
    cli = load_tool("generate")
    flags = ["--load", folder, "--max-new-tokens", "24", "--greedy", "--stop", "never there", "--stop", stop]
    assert cli.main([*flags, "--prompt", PROMPT]) == 0  # streamed
    assert capsys.readouterr().out == PROMPT + want + "\n"
    assert cli.main([*flags, "--prompt", PROMPT, "--prompt", PROMPT]) == 0  # batched
    assert capsys.readouterr().out == f"{PROMPT}{want}\n{'-' * 40}\n" * 2
    assert cli.main(["--load", folder, "--prompt", PROMPT, "--stop", ""]) == 2
    assert "error: --stop needs a non-empty string" in capsys.readouterr().err
