"""The planner against the paper's reported cost, against the model's own saved-tensor count, and
its calibration against the stored benchmark it comes from."""
import pytest
import torch

from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from megallama.planning.calibration import DEFAULT_RESULTS, load_calibration, read_gpu_measurement
from megallama.planning.hardware import gpu_spec
from megallama.planning.layout import Layout, Workload
from megallama.planning.inference import kv_cache_bytes
from megallama.planning.memory import inflight_chunks, layer_activation_bytes, layer_parameters, rank_parameters
from megallama.planning.planner import PlanRequest, plan
from megallama.planning.step_time import step_time
from tests.profiling import saved_activation_bytes

# The paper's Table 15 (A100-80GB GPU-hours) at its token counts (Table 2), on 2048 GPUs with
# 4M-token batches; 65B trained at ~380 tokens/s/GPU (§2.4).
PAPER_GPU_HOURS = {"7b": (1.0e12, 82_432), "13b": (1.0e12, 135_168), "33b": (1.4e12, 530_432),
                   "65b": (1.4e12, 1_022_362)}


@pytest.fixture(scope="module")
def calibration():
    return load_calibration()


def paper_plan(size, calibration, overlap):
    tokens, _ = PAPER_GPU_HOURS[size]
    request = PlanRequest(Workload(LlamaConfig.preset(size), 2048, 2048, bf16=True), gpu_spec("a100-80gb"), 2048,
                          tokens, calibration, overlap_communication=overlap)
    return plan(request)


@pytest.mark.parametrize("size", list(PAPER_GPU_HOURS))
def test_paper_gpu_hours_within_twenty_percent(size, calibration):
    # The paper overlapped activation computation with the GPUs' communication (§2.4): planned so.
    best = paper_plan(size, calibration, overlap=True).fitting[0]
    paper = PAPER_GPU_HOURS[size][1]
    assert abs(best.gpu_hours / paper - 1) <= 0.20, (best.layout.describe(), best.gpu_hours, paper)


def test_paper_65b_tokens_per_second_and_days(calibration):
    best = paper_plan("65b", calibration, overlap=True).fitting[0]
    assert abs(best.time.tokens_per_s_per_gpu / 380 - 1) <= 0.20, best.time
    assert 21 * 0.8 <= best.days <= 21 * 1.2, best.days


def test_this_codebase_without_overlap_is_planned_slower(calibration):
    overlapped = paper_plan("65b", calibration, overlap=True).fitting[0]
    exposed = paper_plan("65b", calibration, overlap=False).fitting[0]
    assert exposed.time.tokens_per_s_per_gpu < overlapped.time.tokens_per_s_per_gpu
    assert exposed.time.data_parallel_exposed + exposed.time.tensor_parallel > 0


def test_overlap_param_gather_hides_only_the_weight_all_gather():
    """pretrain --overlap-param-gather: the weight all-gather behind the first forward, as
    --overlap-communication models it, and the TP collectives still exposed."""
    workload = Workload(LlamaConfig.preset("65b"), 2048, 2048, bf16=True)
    layout = Layout(tp=8, pp=1, dp=256, micro_batch_size=4, sequence_parallel=True, distributed_optimizer=True)
    gpu = gpu_spec("a100-80gb")
    exposed, param_gather, both = (step_time(workload, layout, gpu, 0.5, overlap_communication=c,
                                             overlap_param_gather=g) for c, g in ((False, False), (False, True),
                                                                                  (True, False)))
    assert param_gather.data_parallel_exposed < exposed.data_parallel_exposed
    assert param_gather.data_parallel_exposed == both.data_parallel_exposed
    assert param_gather.tensor_parallel == exposed.tensor_parallel > both.tensor_parallel


def test_calibrated_mfu_reproduces_the_measured_gpu_run(calibration):
    measured = read_gpu_measurement(DEFAULT_RESULTS)
    workload = Workload(measured.model, measured.seq_length, measured.global_batch_size, bf16=True)
    predicted = step_time(workload, Layout(micro_batch_size=measured.micro_batch_size), gpu_spec(measured.gpu),
                          calibration.mfu.value)
    assert predicted.tokens_per_s_per_gpu == pytest.approx(measured.tokens_per_s, rel=1e-9)
    # each constant names the stored result it came from
    assert "pretrain_gpu_h100.txt" in calibration.mfu.source and "66,720" in calibration.mfu.source
    assert "pipeline.json" in calibration.bubble_1f1b.source and "1F1B" in calibration.bubble_1f1b.source
    # the interleaved schedule pretrain runs by default: exchanges overlapped with compute
    assert "pipeline.json" in calibration.bubble_interleaved.source
    assert "interleaved+overlap" in calibration.bubble_interleaved.source


def test_layer_activation_formula_is_what_a_layer_saves():
    """The per-layer term equals the bytes autograd saves for one of the model's own layers
    (serial, fp32; the rotary tables are counted once per model chunk, not per layer)."""
    config = LlamaConfig(num_layers=1, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352,
                         vocab_size=64, max_position_embeddings=64)
    model = LlamaModel(config)
    x = torch.randn(2, 64, 128, requires_grad=True)
    cos, sin = model.rotary(64, x.device)
    saved = saved_activation_bytes(lambda: model.layers["0"](x, cos, sin).sum(),
                                   exclude=[*model.parameters(), cos, sin])
    workload = Workload(config, 64, 2, bf16=False)
    assert saved == layer_activation_bytes(workload, Layout(), tokens=2 * 64)


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-8b", "llama3.2-1b"])
def test_grouped_query_attention_and_tied_embeddings_in_the_counts(name):
    config = LlamaConfig.preset(name)
    workload = Workload(config, 2048, 64)
    assert rank_parameters(workload, Layout(), 0) == config.num_parameters()
    h, d = config.hidden_size, config.head_dim
    # 16 ranks: 8 key/value heads, each replicated on two of them
    assert layer_parameters(workload, 16) == (2 * h * config.num_attention_heads * d // 16  # wq, wo
                                              + 2 * h * d  # wk, wv: one key/value head
                                              + 3 * h * config.ffn_hidden_size // 16 + 2 * h)
    # per token: a key and a value per layer and key/value head, in bf16
    assert kv_cache_bytes(config, 1, 1) == 2 * config.num_layers * 8 * d * 2


def test_pipeline_inflight_counts():
    # 1F1B: rank r of p holds p - r micro-batches; interleaved: 2(p-r-1) + (v-1)p + 1 chunk forwards
    assert [len(inflight_chunks(Layout(pp=4), 16, r)) for r in range(4)] == [4, 3, 2, 1]
    assert len(inflight_chunks(Layout(pp=4, virtual=2), 16, 0)) == 2 * 3 + 4 + 1
    assert len(inflight_chunks(Layout(pp=2, virtual=2), 2, 0)) == 4  # m == p: every forward first


def test_nothing_fits_says_why(calibration):
    request = PlanRequest(Workload(LlamaConfig.preset("65b")), gpu_spec("a100-80gb"), 8, 1e12, calibration)
    result = plan(request)
    assert not result.fitting
    message = result.explain_no_fit()
    assert "nothing fits a100-80gb" in message and "Adam" in message and "GB" in message


def test_no_layout_divides_the_gpus(calibration):
    request = PlanRequest(Workload(LlamaConfig.preset("7b"), global_batch_size=3), gpu_spec("h100-80gb"), 7, 1e12,
                          calibration)
    result = plan(request)
    assert not result.fitting and "no layout of 7 GPUs" in result.explain_no_fit()
