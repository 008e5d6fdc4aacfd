"""FLOPs equal torch's FLOP counter on a real LLaMA step; logs carry Megatron's TensorBoard tags."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from megallama.training.arguments import parse_args
from megallama.training.flops import PEAK_TFLOPS, detect_peak_tflops, estimate_flops, estimate_mfu
from megallama.training.logger import TAGS, TrainingLogger


@pytest.mark.parametrize("layers, hidden, ffn, heads, seq, vocab, batch", [(2, 32, 80, 4, 24, 96, 3),
                                                                          (3, 64, 176, 2, 16, 50, 2)])
def test_estimate_flops_equals_counted_matmul_flops_of_a_training_step(layers, hidden, ffn, heads, seq, vocab, batch):
    # Eager attention: its score and value matmuls are bmm calls the counter sees.
    config = HFLlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=seq, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert estimate_flops(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, seq_length=seq,
                          vocab_size=vocab, num_sequences=batch) == counter.get_total_flops()


def test_estimate_flops_counts_grouped_query_attention_and_the_head_size():
    # 2 key/value heads for 4 query heads of 16 channels, wider than hidden / heads = 12
    layers, hidden, ffn, heads, groups, head_size, seq, vocab, batch = 2, 48, 80, 4, 2, 16, 12, 60, 2
    config = HFLlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_size,
                           max_position_embeddings=seq, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert estimate_flops(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, seq_length=seq,
                          vocab_size=vocab, num_sequences=batch, num_attention_heads=heads,
                          num_query_groups=groups, kv_channels=head_size) == counter.get_total_flops()


def test_mfu_and_peak_table():
    assert estimate_mfu(312e12 * 8 * 2, 2.0, 8, 312.0) == pytest.approx(1.0)
    assert estimate_mfu(1e12, 1.0, 1, None) is None
    assert detect_peak_tflops(torch.bfloat16, torch.device("cpu")) is None
    names = [name for name, _ in PEAK_TFLOPS]
    # A name that contains another must come first, or the shorter one would shadow it.
    for i, name in enumerate(names):
        assert not any(earlier in name for earlier in names[:i]), name


def test_console_line_and_tensorboard_tags(tmp_path):
    config = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                         "--untie-embeddings-and-output-weights", "--seq-length", "16", "--train-iters", "4",
                         "--lr-warmup-iters", "1", "--mock-data",
                         "--global-batch-size", "8", "--log-interval", "2", "--vocab-size", "100",
                         "--tensorboard-dir", str(tmp_path)], env={})
    lines = []
    logger = TrainingLogger(config, enabled=True, num_devices=2, peak_tflops=1e-3, print_fn=lines.append)
    for it, loss in [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)]:
        logger.training_iteration(it, consumed_samples=8 * it, loss=loss, lr=1e-4 * it, grad_norm=0.5, seconds=0.5)
    logger.validation(4, 2.25)
    logger.close()
    assert len(lines) == 3
    assert "iteration        2/4 | consumed samples 16 | consumed tokens 256 | lm loss 3.500000E+00" in lines[0]
    assert "tokens/s 256.0" in lines[0] and "lm loss validation 2.250000E+00" in lines[2]
    flops = estimate_flops(num_layers=2, hidden_size=32, ffn_hidden_size=256, seq_length=16, vocab_size=100,
                           num_sequences=8)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(TAGS)
    loss = events.Scalars("lm loss")
    assert [(e.step, e.value) for e in loss] == [(2, 3.5), (4, 2.25)]
    assert events.Scalars("lm loss validation")[0].step == 4
    assert events.Scalars("tflops")[0].value == pytest.approx(flops / 0.5 / 2 / 1e12)
    assert events.Scalars("mfu")[0].value == pytest.approx(flops / 0.5 / 2 / 1e12 / 1e-3, rel=1e-6)
    assert events.Scalars("mem-max-allocated-bytes")[0].value > 0
