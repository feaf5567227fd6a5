"""The lr schedule is the transformers Trainer's (LLM-Adapters trains with it): each step's lr, as
logged, equals what a real `transformers.Trainer` logs for the same lr, warm-up and step count."""

import dataclasses

import pytest
import torch
from conftest import tiny

from peft_ds.config import SCHEDULES, TrainConfig
from peft_ds.injection import apply_peft
from peft_ds.spec import PeftSpec
from peft_ds.train import make_optimizer

STEPS, WARMUP, LR = 10, 3, 1.0e-2


def trainer_learning_rates(schedule, steps=STEPS, warmup=WARMUP, lr=LR, tmp_dir="."):
    """{step: learning_rate} as a real Trainer logs it, training a tiny LLaMA on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    examples = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * (2 * steps)
    args = TrainingArguments(output_dir=str(tmp_dir), max_steps=steps, warmup_steps=warmup, learning_rate=lr,
                             lr_scheduler_type=SCHEDULES[schedule], logging_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=examples)
    trainer.train()
    return {row["step"]: row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_steps_lr_is_the_trainers(schedule, tmp_path):
    """make_optimizer's scheduler, read before each step as train() logs it, against the Trainer's log."""
    model = tiny("tiny-llama", num_hidden_layers=1)
    apply_peft(model, PeftSpec(method="lora", r=2, alpha=4))
    t = dataclasses.replace(TrainConfig(), lr=LR, warmup_steps=WARMUP, schedule=schedule)
    _, optimizer, scheduler = make_optimizer(model, PeftSpec(method="lora", r=2, alpha=4), t, STEPS)
    ours = {}
    for step in range(1, STEPS + 1):
        ours[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    expected = trainer_learning_rates(schedule, tmp_dir=tmp_path)
    assert ours.keys() == expected.keys()
    for step in ours:
        assert ours[step] == pytest.approx(expected[step], rel=1e-12, abs=1e-15), (step, ours, expected)
    assert ours[1] == 0.0  # the Trainer's first step has lr 0
