"""The stack users would pick instead of peft-ds: transformers `Trainer` + HF `peft` LoRA + DeepSpeed
ZeRO-3 through `TrainingArguments(deepspeed=...)` (LLaMA-Factory / axolotl style), on the CPU over gloo.
Written against the public APIs only; `bench/vs_trainer.py` runs it beside `peft-ds train`.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/peer_trainer.py \
        --model DIR --batches batches.jsonl --deepspeed ds_config.json --out DIR [--steps 30]

`--batches`: one JSON line per example, already padded to its micro-batch (input_ids, attention_mask,
labels), in the order the sequential sampler hands them out (batch 2s to rank 0, 2s+1 to rank 1), so
both tools train on the same micro-batches. Rank 0 writes `steps.jsonl` in --out: per optimizer step
the time from `on_step_begin` to `on_step_end` (forward + backward + optimizer step), the wall-clock
time at its end, and the logged loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# The Trainer uses DeepSpeed on the CPU only when accelerate is told so (use_cpu=True would drop it).
os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--deepspeed", required=True, help="a resolved DeepSpeed config (every value concrete)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    args = parser.parse_args()

    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    with open(args.deepspeed) as f:
        ds = json.load(f)
    PartialState(backend="gloo")  # before TrainingArguments: accelerate keeps this state (use_configured_state)
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=ds["gradient_accumulation_steps"], max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=args.warmup, weight_decay=0.0,
        max_grad_norm=ds.get("gradient_clipping", 1.0), optim="adamw_torch", seed=args.seed,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, remove_unused_columns=False, deepspeed=ds,
        accelerator_config={"use_configured_state": True},
    )
    targs.device  # the process group exists before zero.Init partitions the backbone in from_pretrained
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=args.targets.split(","), bias="none",
                                             task_type="CAUSAL_LM"))
    with open(args.batches) as f:
        examples = [{k: torch.tensor(v) for k, v in json.loads(line).items()} for line in f]

    main_rank = int(os.environ.get("RANK", "0")) == 0
    log = open(os.path.join(args.out, "steps.jsonl"), "w") if main_rank else None

    class StepTimes(TrainerCallback):
        """Forward + backward + optimizer step of each global step (batch fetch and logging excluded)."""

        def on_step_begin(self, targs, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            self.row = {"step": state.global_step, "step_s": time.perf_counter() - self.began, "end": time.time()}

        def on_log(self, targs, state, control, logs=None, **kw):
            if log is not None and "loss" in (logs or {}):
                log.write(json.dumps({**self.row, "loss": logs["loss"]}) + "\n")
                log.flush()

    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=default_data_collator,
                      callbacks=[StepTimes()])
    trainer.model_accepts_loss_kwargs = False  # the loss is each micro-batch's mean, as peft-ds's
    trainer.train()
    trainer.save_model()  # the adapter, as a user's run ends
    if log is not None:
        log.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
