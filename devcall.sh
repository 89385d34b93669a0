#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=$OUT/mem4; mkdir -p $R
CASES=(--case gpt2-xl-moe model.n_layers=2 --case gpt2-xl-moe model.n_layers=2 train.activation_checkpointing=full
       --case gpt2-xl-moe model.n_layers=2 train.activation_checkpointing=moe
       --case mixtral-8x7b model.n_layers=2 --case qwen3-30b-a3b model.n_layers=2
       --case deepseek-v3 model.n_layers=2 model.first_dense=1 model.moe.num_experts=32)
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 scripts/memory_census.py $R/census_h200.json --batch 1 --seq-len 1000 "${CASES[@]}" > $R/census.log 2>&1
C="train.log_every=1 train.eval_every=100000 train.ckpt_every=100000"
T="bash scripts/device_train.sh $R train"
for s in none optimizer; do
  $T 0,1 dp2$s 75 --config gpt2-xl-moe --shard $s --steps 14 --set model.n_layers=8 train.batch_size=16 $C
done > $R/g2.log 2>&1
for f in $R/train_*.jsonl; do echo "$(basename $f) $(python3 -c "
import json,statistics; r=[json.loads(l) for l in open('$f')]; print('peak', max(x.get('peak_mem_gb',0) for x in r), 'tps', round(statistics.median(x['tokens_per_s'] for x in r[2:] or r)), 'losses', [round(x['loss'],4) for x in r])")"; done > $R/peaks.txt
cat $R/peaks.txt; tail -3 $R/census.log; grep -h "optimizer state split" $R/*.log
tar czf $OUT/mem4.tgz -C $OUT mem4
