"""Quality evaluations: bits per byte, HumanEval pass@1, single-line infilling, held-out line
completion and syntax validity (code benchmarks run generated code in sandboxed subprocesses)."""
from .bpb import bits_per_byte
from .code_quality import edit_similarity, exact_match, syntax_valid, truncate_completion
from .execution import ExecResult, run_program, run_programs
from .generate import Decoding, Task, run_tasks
from .humaneval import evaluate_humaneval, evaluate_infill, infill_cases, load_problems, splice
from .line_completion import evaluate_lines, load_heldout

__all__ = [
    "Decoding", "ExecResult", "Task", "bits_per_byte", "edit_similarity", "evaluate_humaneval", "evaluate_infill",
    "evaluate_lines", "exact_match", "infill_cases", "load_heldout", "load_problems", "run_program",
    "run_programs", "run_tasks", "splice", "syntax_valid", "truncate_completion",
]
