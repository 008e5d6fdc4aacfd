import pytest

from megallama.config import LlamaConfig
from megallama.pipeline import ActivationShape, stage_spec, virtual_size_from_layers_per_stage
from megallama.pipeline.schedules import (forward_backward_no_pipelining,
                                          forward_backward_pipelining_with_interleaving,
                                          forward_backward_pipelining_without_interleaving,
                                          get_forward_backward_func)


def layers(n: int) -> LlamaConfig:
    return LlamaConfig(num_layers=n, hidden_size=8, num_attention_heads=2, ffn_hidden_size=8, vocab_size=8)


@pytest.mark.parametrize("num_layers,p,v", [(8, 1, None), (8, 2, None), (8, 4, None), (8, 2, 2),
                                            (8, 4, 2), (12, 2, 3), (16, 2, 4)])
def test_stages_cover_every_layer_once_in_order(num_layers, p, v):
    model = layers(num_layers)
    order = []  # the order activations visit the chunks: virtual rank outer, pipeline rank inner
    for vr in range(v or 1):
        for r in range(p):
            spec = stage_spec(model, p, r, v, vr)
            assert spec.pre_process == (r == 0 and vr == 0)
            assert spec.post_process == (r == p - 1 and vr == (v or 1) - 1)
            order.extend(spec.layer_ids)
    assert order == list(range(num_layers))


def test_interleaved_assignment_matches_megatron():
    # 8 layers, 2 ranks, 2 chunks: rank 0 holds [0, 1] and [4, 5]; rank 1 [2, 3] and [6, 7].
    assert [stage_spec(layers(8), 2, 0, 2, c).layer_ids for c in range(2)] == [[0, 1], [4, 5]]
    assert [stage_spec(layers(8), 2, 1, 2, c).layer_ids for c in range(2)] == [[2, 3], [6, 7]]


def test_layers_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_layers \(10\) is not divisible by pipeline_model_parallel_size \(4\)"):
        stage_spec(layers(10), 4, 0)
    with pytest.raises(ValueError, match=r"num_layers \(12\) .* virtual_pipeline_model_parallel_size \(4\) = 16"):
        stage_spec(layers(12), 4, 0, 4, 0)
    with pytest.raises(ValueError, match=r"num_layers \(12\) .*num_layers_per_virtual_pipeline_stage \(4\)"):
        virtual_size_from_layers_per_stage(12, 2, 4)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size >= 2"):
        virtual_size_from_layers_per_stage(8, 1, 2)


def test_virtual_size_from_layers_per_stage():
    assert virtual_size_from_layers_per_stage(80, 4, 5) == 4
    assert virtual_size_from_layers_per_stage(8, 2, None) is None


def test_tensor_shape_under_sequence_parallelism():
    assert ActivationShape(32, 2, 64).tensor_shape() == (2, 32, 64)
    assert ActivationShape(32, 2, 64, sequence_parallel=True).tensor_shape(4) == (2, 8, 64)
    with pytest.raises(ValueError, match=r"seq_length \(30\) divisible by tensor_model_parallel_size \(4\)"):
        ActivationShape(30, 2, 64, sequence_parallel=True).tensor_shape(4)


def test_schedule_choice():
    assert get_forward_backward_func(1, None) is forward_backward_no_pipelining
    assert get_forward_backward_func(2, None) is forward_backward_pipelining_without_interleaving
    assert get_forward_backward_func(2, 1) is forward_backward_pipelining_without_interleaving
    for overlap in (True, False):
        interleaved = get_forward_backward_func(4, 2, overlap_p2p_comm=overlap)
        assert interleaved.func is forward_backward_pipelining_with_interleaving
        assert interleaved.keywords == {"overlap_p2p_comm": overlap}
    assert get_forward_backward_func(4, 2).keywords == {"overlap_p2p_comm": True}  # Megatron's default
    with pytest.raises(ValueError, match="needs pipeline_model_parallel_size >= 2"):
        get_forward_backward_func(1, 2)
