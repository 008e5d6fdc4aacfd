#!/usr/bin/env bash
# LLaMA-3-8B (8.0B parameters: 32 layers, dim 4096, 32 heads, 8 K/V heads (grouped-query attention),
# FFN 14336, RoPE θ = 500000, untied, 128,256-token byte-level BPE vocabulary), sequences of 8192
# tokens, 4M-token batches (512 × 8192), 15T tokens = 3,576,279 iterations of 4,194,304 tokens.
# Meta publishes no 8B recipe or data mixture: this keeps LLaMA-2-7B's optimisation (peak lr 3e-4)
# and LLaMA-1's mixture (pretrain_llama_common.sh), tokenized with LLaMA-3's tokenizer:
#   python tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model $TOKENIZER_MODEL ...
# TOKENIZER_MODEL is a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json), e.g.
# that of Meta-Llama-3-8B. The shape flags spell out what --model-size llama3-8b presets, in Megatron's
# names. Usage, on every node:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama3_8b.sh
#
# Layout: the planner's first choice for 64 A100-80GB at micro-batch 1 (tests/planning checks it):
#   python tools/plan.py --model-size llama3-8b --seq-length 8192 --global-batch-size 512 \
#       --gpus 64 --train-tokens 15e12 --micro-batch-size 1 --overlap-param-gather
#   → TP=2 (within a node) PP=1 DP=32, sequence parallelism, distributed optimizer: 41.4 GB per GPU,
#     2,444 tokens/s/GPU (TP=1 fits with pipeline stages, at best 2,299, or at PP=1 only with full
#     recomputation, 1,900).
DATA_DIR=${DATA_DIR:-data/llama3}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA_DIR/tokenizer}
MODEL_SIZE=llama3-8b LR=3.0e-4 TRAIN_ITERS=3576279 TP=2 PP=1
SEQ_LENGTH=8192 GLOBAL_BATCH_SIZE=512 TOKENIZER_TYPE=HuggingFaceTokenizer VOCAB_SIZE=128256
EXTRA_FLAGS="--sequence-parallel --group-query-attention --num-query-groups 8 --rotary-base 500000
  --untie-embeddings-and-output-weights"
source "$(dirname "$0")/pretrain_llama_common.sh"
