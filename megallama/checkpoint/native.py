"""megallama's own checkpoints (``SAVE/iter_NNNNNNN/``, see ``megallama.checkpoint.storage``).

Reading asks the storage layer's piece loader for each full tensor, whatever TP/PP/DP layout
saved it. Writing lays the tensors out as a run with the target TP × PP (DP 1, no ZeRO) would save
them: one rank file per model-parallel rank holding its pieces, then ``metadata.json``, then the
tracker. ``--load`` of that folder by ``megallama.pretrain`` starts training from these weights.
From another megallama checkpoint the optimizer state, iteration and consumed samples come along;
from HF or Meta the run starts at iteration 0 with a fresh optimizer.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re

import torch

from megallama.checkpoint import storage as ckpt
from megallama.checkpoint.base import (
    CheckpointFormat,
    CheckpointReader,
    copy_tokenizer,
    is_hf_tokenizer,
    progress_bar,
    stored_tokenizer,
)
from megallama.checkpoint.sharded import row_blocks
from megallama.config import LlamaConfig
from megallama.parameter_table import ParameterSpec, parameter_table
from megallama.pipeline.stages import stage_spec

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
        self.common = self.metadata["common"]
        self.config = dataclasses.replace(LlamaConfig.from_run_config(self.common["config"]),
                                          sequence_parallel=False, recompute_granularity=None)
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
        stored = stored_tokenizer(self.source)
        if stored is not None:
            return stored
        path = self.common["config"]["data"]["tokenizer_model"]  # the one the run trained with
        return path if path and (os.path.isfile(path) or is_hf_tokenizer(path)) else None


def _imported_run_config(config: LlamaConfig, dtype: torch.dtype, tp: int, pp: int,
                         tokenizer_model: str | None) -> dict:
    """The run configuration stored with weights that came from elsewhere (HF, Meta), in the
    layout of ``PretrainConfig.to_dict`` version 2 (groups and fields left out take their defaults)."""
    # training keeps fp32 weights unless it runs in bf16
    model = dataclasses.replace(config, params_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    return {"version": 2, "model": model.to_dict(),
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "world_size": tp * pp},
            "data": {"tokenizer_type": _tokenizer_type(tokenizer_model),
                     "tokenizer_model": os.path.abspath(tokenizer_model) if tokenizer_model else None},
            "training": {"seq_length": config.max_position_embeddings}}


def _tokenizer_type(tokenizer_model: str | None) -> str:
    if tokenizer_model is None:
        return "NullTokenizer"
    return "HuggingFaceTokenizer" if is_hf_tokenizer(tokenizer_model) else "SentencePieceTokenizer"


def _resharded_run_config(run: dict, tp: int, pp: int) -> dict:
    """A megallama checkpoint's stored run configuration, for the layout it is rewritten in: TP × PP
    ranks, no virtual stages, optimizer state whole (no ZeRO: DP is 1)."""
    run = copy.deepcopy(run)
    run["parallel"].update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=tp * pp,
                           num_layers_per_virtual_pipeline_stage=None)
    # version 2 moved the flag into the optimizer group
    holder = run.setdefault("optimizer", {}) if run.get("version", 1) >= 2 else run["parallel"]
    holder["use_distributed_optimizer"] = False
    return run


def _piece(key: str, data: torch.Tensor, global_shape: tuple, offsets: tuple) -> ckpt.ShardedTensor:
    if key.startswith("optimizer."):  # training saves optimizer state as flat ranges (ZeRO or not)
        return ckpt.ShardedTensor(key, data.reshape(-1), global_shape, offsets, shape=tuple(data.shape),
                                  flat_range=(0, data.numel()))
    return ckpt.ShardedTensor(key, data, global_shape, offsets)


def _rank_pieces(full: torch.Tensor, key: str, spec: ParameterSpec, tp_rank: int, tp: int) -> list[ckpt.ShardedTensor]:
    """The pieces of ``full`` that TP rank ``tp_rank`` saves (as the training code lays them out)."""
    if spec.split is None:
        return [_piece(key, full, tuple(full.shape), (0,) * full.dim())] if tp_rank == 0 else []
    local = spec.split.shard(full, tp_rank, tp)
    pieces = []
    for block in row_blocks(spec.split, spec.shape, tp_rank, tp):
        if block.replica:  # the first rank holding these rows saves them
            continue
        data = local if spec.split.dim != 0 else local[block.start:block.stop]
        pieces.append(_piece(key, data, block.global_shape, block.offsets))
    return pieces


def save_megallama(reader: CheckpointReader, folder: str, tp: int, pp: int, tokenizer_model: str | None = None,
                   progress: bool = True) -> None:
    """Write ``reader``'s checkpoint for TP × PP ranks, one rank file at a time."""
    config = reader.config
    try:
        config.check_parallel_layout(tp, pp)
    except ValueError as error:
        raise ValueError(f"cannot write for --target-tensor-parallel-size {tp} × --target-pipeline-parallel-size "
                         f"{pp}: {error}") from None
    table = parameter_table(config)
    from_megallama = isinstance(reader, MegallamaReader)
    keys = reader.keys() if from_megallama else [f"model.{n}" for n in table]
    if from_megallama:
        common = {**reader.common, "config": _resharded_run_config(reader.common["config"], tp, pp)}
        iteration = reader.iteration
    else:  # no schedule to record: the run that trains from these weights sets its own
        common = {"iteration": 0, "consumed_samples": 0, "optimizer_step": 0,
                  "config": _imported_run_config(config, reader.dtype, tp, pp, tokenizer_model)}
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
        stage = stage_spec(config, pp, pp_rank)
        held = parameter_table(config, stage.layer_ids, stage.pre_process, stage.post_process)
        stage_keys = [k for k in keys if _parameter_of(k) in held]
        for tp_rank in range(tp):
            rank = tp_rank + tp * pp_rank  # Megatron's order: TP fastest, then DP (1 here), then PP
            pieces = []
            for key in stage_keys:
                full = reader.load_key(key) if from_megallama else reader.load(key[len("model."):])
                pieces += _rank_pieces(full, key, table[_parameter_of(key)], tp_rank, tp)
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


def _write(reader: CheckpointReader, folder: str, tensor_parallel_size: int | None,
           pipeline_parallel_size: int | None, tokenizer_model: str | None, progress: bool) -> None:
    save_megallama(reader, folder, tensor_parallel_size or 1, pipeline_parallel_size or 1,
                   tokenizer_model=tokenizer_model, progress=progress)


FORMAT = CheckpointFormat(
    name="megallama", looks_for=f"{ckpt.TRACKER_FILENAME} or an iter_NNNNNNN folder's {ckpt.METADATA_FILENAME}",
    detect=lambda files: ckpt.TRACKER_FILENAME in files or ckpt.METADATA_FILENAME in files,
    reader=MegallamaReader, writer=_write)
