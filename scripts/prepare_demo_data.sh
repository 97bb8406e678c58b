#!/usr/bin/env bash
# Build the demo data under data/demo/ (git-ignored), without any download:
#   data/demo/stdlib.jsonl                      the corpus: the Python standard library's sources
#   data/demo/tokenizer/tokenizer.json          a 4096-token byte-level BPE trained on it
#   data/demo/demo_text_document.{bin,idx}      the training dataset (all but the last 5% of modules)
#   data/demo/demo_valid_text_document.{bin,idx} the validation dataset (the last 5%)
# Idempotent: each step is skipped when its outputs are newer than its inputs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
py=.venv/bin/python
out=data/demo
mkdir -p "$out"
workers="${WORKERS:-$(nproc)}"

# true when $1 is missing or older than any of the remaining files
stale() {
  local target="$1"; shift
  [ -e "$target" ] || return 0
  for dep in "$@"; do [ "$dep" -nt "$target" ] && return 0; done
  return 1
}

corpus="$out/stdlib.jsonl"
if stale "$corpus" tools/gather_demo_corpus.py mm_megatron/data/demo_corpus.py; then
  $py tools/gather_demo_corpus.py --output "$corpus"
fi

# Hold out the last 5% of modules for validation (by line, deterministic).
train="$out/stdlib_train.jsonl"; valid="$out/stdlib_valid.jsonl"
if stale "$valid" "$corpus" || stale "$train" "$corpus"; then
  n=$(wc -l < "$corpus"); k=$(( n / 20 > 0 ? n / 20 : 1 ))
  head -n $(( n - k )) "$corpus" > "$train.tmp" && mv "$train.tmp" "$train"
  tail -n "$k" "$corpus" > "$valid.tmp" && mv "$valid.tmp" "$valid"
fi

tok="$out/tokenizer/tokenizer.json"
if stale "$tok" "$train" tools/train_tokenizer.py mm_megatron/data/bpe_trainer.py; then
  $py tools/train_tokenizer.py --input "$train" --vocab-size 4096 --output-dir "$out/tokenizer"
fi

for split in train valid; do
  name=demo_text_document; [ "$split" = valid ] && name=demo_valid_text_document
  src="$out/stdlib_$split.jsonl"
  if stale "$out/$name.idx" "$src" "$tok" mm_megatron/data/preprocess.py; then
    $py tools/preprocess_data.py --input "$src" --output-prefix "$out/$name" \
      --tokenizer "$tok" --workers "$workers" --no-progress
  fi
done
echo "demo data ready in $out:"
ls -l "$out" | sed 1d
