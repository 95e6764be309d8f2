"""Recovery: the pruned model back to quality as exact int4 groups. The stage (order, quantizer,
training, teacher pass) is stage.py; its parts: data.py (recovery text), generate.py (text
written by the dense model), distill.py (the teacher and its cache), adapters.py (LoRA /
QA-LoRA), params.py (the int4 groups' own parts), train.py (the loop and its checkpoints).
"""

from saap_edge.recover.stage import (  # noqa: F401
    RecoverRun,
    Recovered,
    as_slim,
    checkpoint_dir,
    clear_checkpoints,
    recover_model,
    recovery_data,
    teacher_pass,
)
