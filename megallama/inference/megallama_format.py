"""megallama's own checkpoints (``SAVE/iter_NNNNNNN/``, see ``megallama.training.checkpointing``).

Reading asks the training code's piece loader for each full tensor, whatever TP/PP/DP layout
saved it. Writing lays the tensors out as a run with the target TP × PP (DP 1, no ZeRO) would save
them: one rank file per model-parallel rank holding its pieces, then ``metadata.json``, then the
tracker. ``--load`` of that folder by ``megallama.pretrain`` starts training from these weights.
From another megallama checkpoint the optimizer state, iteration and consumed samples come along;
from HF or Meta the run starts at iteration 0 with a fresh optimizer.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from megallama.config import LlamaConfig
from megallama.inference.checkpoint_io import CheckpointReader, copy_tokenizer, parameter_layout, progress_bar
from megallama.parallel.layers import pad_to_multiple, shard_tensor
from megallama.pipeline.stages import stage_spec
from megallama.training import checkpointing as ckpt
from megallama.training.config import DataArgs, ModelArgs, ParallelArgs, PretrainConfig, TrainingArgs
from megallama.training.sharded_state import row_blocks

_OPTIMIZER_KEY = re.compile(r"^optimizer\.(.+)\.(main_param|exp_avg|exp_avg_sq)$")


def _parameter_of(key: str) -> str:
    """The model parameter a checkpoint key belongs to (``model.X`` or ``optimizer.X.what``)."""
    if key.startswith("model."):
        return key[len("model."):]
    match = _OPTIMIZER_KEY.match(key)
    if not match:
        raise KeyError(f"unexpected tensor {key!r} in a megallama checkpoint")
    return match.group(1)


class MegallamaReader(CheckpointReader):
    format = "megallama"

    def __init__(self, path: str):
        self.source = path
        if os.path.isfile(os.path.join(path, ckpt.TRACKER_FILENAME)):
            found = ckpt.latest_checkpoint(path)
            self.iteration, self.iter_dir, self.metadata = found
        else:  # one iter_NNNNNNN folder
            self.iter_dir, self.metadata = path, ckpt.read_metadata(path)
            self.iteration = self.metadata["iteration"]
        from megallama.training.loop import llama_config

        self.common = self.metadata["common"]
        self.pretrain_config = PretrainConfig.from_dict(self.common["config"])
        self.config = dataclasses.replace(llama_config(self.pretrain_config), sequence_parallel=False,
                                          recompute_granularity=None)
        pieces = self.metadata["pieces"]
        missing = [n for n in self.names() if f"model.{n}" not in pieces]
        if missing:
            raise KeyError(f"{self.iter_dir} lacks model tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")

    def keys(self) -> list[str]:
        """Every tensor saved (model weights, then optimizer state), in checkpoint names."""
        return list(self.metadata["pieces"])

    def load_key(self, key: str) -> torch.Tensor:
        entry = self.metadata["pieces"][key][0]
        shape = tuple(entry["global_shape"])
        full = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        ckpt.load_pieces(self.iter_dir, self.metadata,
                         [ckpt.ShardedTensor(key, full, shape, (0,) * len(shape))])
        return full

    def load(self, name: str) -> torch.Tensor:
        return self.load_key(f"model.{name}")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.metadata["pieces"]["model.norm.weight"][0]["dtype"])

    def tokenizer_model(self) -> str | None:
        path = os.path.join(self.source, "tokenizer.model")
        if os.path.isfile(path):
            return path
        path = self.pretrain_config.data.tokenizer_model
        return path if path and os.path.isfile(path) else None


def _pretrain_config(config: LlamaConfig, dtype: torch.dtype, tp: int, pp: int,
                     tokenizer_model: str | None) -> PretrainConfig:
    """The run configuration stored with weights that came from elsewhere (HF, Meta)."""
    return PretrainConfig(
        model=ModelArgs(num_layers=config.num_layers, hidden_size=config.hidden_size,
                        num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.ffn_hidden_size,
                        seq_length=config.max_position_embeddings,
                        max_position_embeddings=config.max_position_embeddings, norm_epsilon=config.norm_epsilon,
                        vocab_size=config.vocab_size, init_method_std=config.init_method_std,
                        rope_theta=config.rope_theta),
        parallel=ParallelArgs(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=tp * pp),
        training=TrainingArgs(bf16=dtype == torch.bfloat16),
        data=DataArgs(tokenizer_type="SentencePieceTokenizer" if tokenizer_model else "NullTokenizer",
                      tokenizer_model=os.path.abspath(tokenizer_model) if tokenizer_model else None),
    )


def _piece(key: str, data: torch.Tensor, global_shape: tuple, offsets: tuple) -> ckpt.ShardedTensor:
    if key.startswith("optimizer."):  # training saves optimizer state as flat ranges (ZeRO or not)
        return ckpt.ShardedTensor(key, data.reshape(-1), global_shape, offsets, shape=tuple(data.shape),
                                  flat_range=(0, data.numel()))
    return ckpt.ShardedTensor(key, data, global_shape, offsets)


def _rank_pieces(full: torch.Tensor, key: str, info, tp_rank: int, tp: int) -> list[ckpt.ShardedTensor]:
    """The pieces of ``full`` that TP rank ``tp_rank`` saves (as the training code lays them out)."""
    if info.dim is None:
        return [_piece(key, full, tuple(full.shape), (0,) * full.dim())] if tp_rank == 0 else []
    size = full.shape[info.dim]
    # only a vocabulary may be indivisible (the config check rules out the rest): padded as the layers do
    padded = pad_to_multiple(size, tp) if info.stack == 1 and info.dim == 0 and size % tp else None
    local = shard_tensor(full, info.dim, stacked=info.stack, padded_size=padded, rank=tp_rank, world_size=tp)
    local.tensor_model_parallel, local.partition_dim, local.partition_stack = True, info.dim, info.stack
    local.full_shape = tuple(full.shape)
    pieces = []
    for block in row_blocks(local, tp_rank, tp):
        data = local if info.dim != 0 else local[block.start:block.stop]
        pieces.append(_piece(key, data, block.global_shape, block.offsets))
    return pieces


def save_megallama(reader: CheckpointReader, folder: str, tp: int, pp: int, tokenizer_model: str | None = None,
                   progress: bool = True) -> None:
    """Write ``reader``'s checkpoint for TP × PP ranks, one rank file at a time."""
    config = reader.config
    for what, value in (("num_attention_heads", config.num_attention_heads),
                        ("ffn_hidden_size", config.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"--target-tensor-parallel-size {tp} does not divide {what} ({value})")
    if config.num_layers % pp:
        raise ValueError(f"--target-pipeline-parallel-size {pp} does not divide num_layers ({config.num_layers})")
    layout = parameter_layout(config)
    from_megallama = isinstance(reader, MegallamaReader)
    keys = reader.keys() if from_megallama else [f"model.{n}" for n in layout]
    if from_megallama:
        pretrain = reader.pretrain_config
        pretrain.parallel = dataclasses.replace(pretrain.parallel, tensor_model_parallel_size=tp,
                                                pipeline_model_parallel_size=pp, world_size=tp * pp,
                                                num_layers_per_virtual_pipeline_stage=None,
                                                use_distributed_optimizer=False)
        common = {**reader.common, "config": pretrain.to_dict()}
        iteration = reader.iteration
    else:
        pretrain = _pretrain_config(config, reader.dtype, tp, pp, tokenizer_model)
        common = {"iteration": 0, "consumed_samples": 0, "optimizer_step": 0,
                  "lr_schedule": dataclasses.asdict(pretrain.lr_schedule), "config": pretrain.to_dict()}
        iteration = 0
    common["layout"] = {"world_size": tp * pp, "tensor": tp, "pipeline": pp, "virtual": None}
    same_layout = from_megallama and reader.common.get("layout") == common["layout"]
    if not same_layout:
        # No rank's RNG state of a run in this layout exists. The trainer restores RNG states only
        # for the layout that saved them; this mark never equals a run's layout, so it doesn't.
        common["layout"]["rng_states"] = "none (converted checkpoint)"

    iter_dir = ckpt.checkpoint_dir(folder, iteration)
    os.makedirs(iter_dir, exist_ok=True)
    bar = progress_bar(tp * len(keys), progress, "writing megallama rank files")
    rank_files = []
    for pp_rank in range(pp):
        spec = stage_spec(config.num_layers, pp, pp_rank)
        held = {f"layers.{i}." for i in spec.layer_ids}
        stage_keys = [k for k in keys if _held(_parameter_of(k), spec, held)]
        for tp_rank in range(tp):
            rank = tp_rank + tp * pp_rank  # Megatron's order: TP fastest, then DP (1 here), then PP
            pieces = []
            for key in stage_keys:
                full = reader.load_key(key) if from_megallama else reader.load(key[len("model."):])
                pieces += _rank_pieces(full, key, layout[_parameter_of(key)], tp_rank, tp)
                bar.update()
            # RNG states belong to a rank of a layout: kept only when the layout is unchanged.
            rank_state = ckpt.read_rank_state(reader.iter_dir, rank, reader.metadata) if same_layout else {}
            rank_files.append(ckpt.write_rank_file(iter_dir, rank, pieces, rank_state))
            del pieces
        bar.update(tp * (len(keys) - len(stage_keys)))
    bar.close()
    ckpt.write_metadata(iter_dir, iteration, tp * pp, rank_files, common)
    copy_tokenizer(tokenizer_model, folder)
    ckpt.write_tracker(folder, iteration)


def _held(name: str, spec, layer_prefixes: set) -> bool:
    if name.startswith("layers."):
        return name[:name.index(".", len("layers.")) + 1] in layer_prefixes
    if name == "tok_embeddings.weight":
        return spec.pre_process
    return spec.post_process  # norm, output
