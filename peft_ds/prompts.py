"""Training and evaluation prompt templates used by LLM-Adapters.

Copied byte-for-byte from ``generate_prompt`` in LLM-Adapters ``finetune.py``
(https://github.com/AGI-Edgerunners/LLM-Adapters/blob/main/finetune.py), including its
unusual whitespace: the line after the header is truly empty, every later line is
indented with 16 spaces (the later "blank" separator lines consist of exactly 16
spaces), the with-input header line ends with one trailing space and the no-input
header line ends with two trailing spaces.
The evaluation template (``generate_prompt`` in LLM-Adapters ``evaluate.py`` and
``commonsense_evaluate.py``) differs on purpose, as upstream: its blank lines are truly
empty, the no-input header ends with one trailing space and the with-input header with
none, and it ends with ``### Response:`` and a newline plus 16 spaces.
Do not reformat this file.
"""


def generate_prompt(data_point):
    if data_point["input"]:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. 

                ### Instruction:
                {data_point["instruction"]}
                
                ### Input:
                {data_point["input"]}
                
                ### Response:
                {data_point["output"]}"""
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request.  

                ### Instruction:
                {data_point["instruction"]}
                
                ### Response:
                {data_point["output"]}"""


def evaluation_prompt(instruction, input=None):
    if input:
        return f"""Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

                ### Instruction:
                {instruction}

                ### Input:
                {input}

                ### Response:
                """  # noqa: E501
    else:
        return f"""Below is an instruction that describes a task. Write a response that appropriately completes the request. 

                ### Instruction:
                {instruction}

                ### Response:
                """  # noqa: E501
