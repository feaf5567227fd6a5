"""The LLM-Adapters prompts, byte for byte. Every expected string below was written out by hand from
the upstream functions (AGI-Edgerunners/LLM-Adapters@8166572 `finetune.py` generate_prompt, and
`evaluate.py` / `commonsense_evaluate.py` generate_prompt; Jaygagaga/SIBO@f290cfc carries identical
copies), not produced by the code under test. Whitespace is the point: the training template's line
after the header is empty, its later blank lines are 16 spaces; the evaluation template's blank
lines are all empty."""

from peft_ds.prompts import evaluation_prompt, generate_prompt

PAD = " " * 16
TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    + PAD + "### Instruction:\n"
    + PAD + "What is 2 + 3?\n"
    + PAD + "\n"
    + PAD + "### Response:\n"
    + PAD + "2 + 3 = 5.\nThe answer is 5.")
TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    + PAD + "### Instruction:\n"
    + PAD + "Add the numbers.\n"
    + PAD + "\n"
    + PAD + "### Input:\n"
    + PAD + "2 and 3\n"
    + PAD + "\n"
    + PAD + "### Response:\n"
    + PAD + "5")
EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    + PAD + "### Instruction:\n"
    + PAD + "What is 2 + 3?\n"
    "\n"
    + PAD + "### Response:\n"
    + PAD)
EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    + PAD + "### Instruction:\n"
    + PAD + "Add them.\n"
    "\n"
    + PAD + "### Input:\n"
    + PAD + "2 and 3\n"
    "\n"
    + PAD + "### Response:\n"
    + PAD)


def test_training_prompt_without_input_is_upstream_bytes():
    record = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5.\nThe answer is 5."}
    assert generate_prompt(record) == TRAIN_NO_INPUT


def test_training_prompt_with_input_is_upstream_bytes():
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert generate_prompt(record) == TRAIN_WITH_INPUT


def test_evaluation_prompt_is_upstream_bytes():
    assert evaluation_prompt("What is 2 + 3?") == EVAL_NO_INPUT
    assert evaluation_prompt("What is 2 + 3?", "") == EVAL_NO_INPUT
    assert evaluation_prompt("Add them.", "2 and 3") == EVAL_WITH_INPUT

