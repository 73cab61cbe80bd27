"""Mercury's next-edit prompt (`/v1/edit/completions`), read and turned into a fill-in-the-middle task.

The request's one user message carries tagged sections:

    <|recently_viewed_code_snippets|>
    <|recently_viewed_code_snippet|>
    code_snippet_file_path: utils.py
    ...code...
    <|/recently_viewed_code_snippet|>
    <|/recently_viewed_code_snippets|>
    <|current_file_content|>
    current_file_path: add.py
    ...code before...
    <|code_to_edit|>
    ...the region, with <|cursor|> somewhere in it...
    <|/code_to_edit|>
    ...code after...
    <|/current_file_content|>
    <|edit_diff_history|>
    ...recent edits, as diffs or notes...
    <|/edit_diff_history|>

The answer is the region rewritten. unmask implements it as regeneration of the region conditioned
on everything else, by infilling: the prefix is a header (each recently viewed snippet after a
`# file: PATH` line, then the edit history as `# ` comment lines, then `# file: PATH` of the current
file) followed by the code before the region; the suffix is the code after it; the model writes the
middle. A model fine-tuned on edit examples in the same shape (`unmask finetune`, records with
`messages` holding these sections and the rewritten region as the assistant's answer) learns this
task; an ordinary infilling model rewrites the region as it would fill any gap. The cursor marks
where the user is, and is removed from the region.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError

CURSOR = "<|cursor|>"
WHERE = "messages[0].content"


@dataclass(frozen=True)
class EditPrompt:
    path: str
    before: str
    region: str  # the code to edit, cursor removed
    after: str
    cursor: int | None = None  # offset of the cursor in `region`
    snippets: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (path, code)
    history: str = ""


def _section(text: str, tag: str, required: bool) -> str | None:
    found = re.findall(rf"<\|{tag}\|>(.*?)<\|/{tag}\|>", text, flags=re.S)
    if len(found) > 1:
        raise UserError(f"{WHERE}: <|{tag}|> appears {len(found)} times; give it once")
    if not found:
        if required or f"<|{tag}|>" in text or f"<|/{tag}|>" in text:
            raise UserError(f"{WHERE}: the <|{tag}|> ... <|/{tag}|> section is missing or not closed")
        return None
    return found[0]


def _trim(s: str) -> str:
    """A section's own line breaks (after the opening tag, before the closing one) are layout."""
    s = s[1:] if s.startswith("\n") else s
    return s[:-1] if s.endswith("\n") else s


def _header(body: str, key: str) -> tuple[str, str]:
    first, _, rest = body.partition("\n")
    if not first.startswith(key + ":"):
        raise UserError(f"{WHERE}: a section must start with a '{key}: PATH' line")
    return first[len(key) + 1:].strip(), rest


def parse_edit(content: str) -> EditPrompt:
    """The tagged sections of an edit request; UserError (one line, naming the field) if malformed."""
    if not isinstance(content, str) or not content.strip():
        raise UserError(f"{WHERE} is empty; it must hold the <|current_file_content|> and <|code_to_edit|> sections")
    current = _trim(_section(content, "current_file_content", True))
    path, code = _header(current, "current_file_path")
    if code.count("<|code_to_edit|>") != 1 or code.count("<|/code_to_edit|>") != 1:
        raise UserError(f"{WHERE}: <|current_file_content|> must hold one <|code_to_edit|> ... <|/code_to_edit|> region")
    before, rest = code.split("<|code_to_edit|>")
    if "<|/code_to_edit|>" not in rest:
        raise UserError(f"{WHERE}: <|/code_to_edit|> comes before <|code_to_edit|>; close the region after opening it")
    region, after = rest.split("<|/code_to_edit|>")
    region = _trim(region)
    after = after[1:] if after.startswith("\n") else after
    if region.count(CURSOR) > 1:
        raise UserError(f"{WHERE}: <|cursor|> appears more than once in <|code_to_edit|>")
    cursor = region.find(CURSOR)
    region = region.replace(CURSOR, "")
    snippets = []
    viewed = _section(content, "recently_viewed_code_snippets", False)
    if viewed is not None:
        for body in re.findall(r"<\|recently_viewed_code_snippet\|>(.*?)<\|/recently_viewed_code_snippet\|>",
                               viewed, flags=re.S):
            snippets.append(_header(_trim(body), "code_snippet_file_path"))
    history = _section(content, "edit_diff_history", False)
    return EditPrompt(path, before, region, after, cursor if cursor >= 0 else None, tuple(snippets),
                      _trim(history) if history else "")


def edit_task(e: EditPrompt) -> tuple[str, str | None]:
    """(prefix, suffix) of the infilling task whose middle is the rewritten region; suffix None (a
    plain completion) when no code follows the region."""
    head = [f"# file: {p}\n{code.rstrip()}\n\n" for p, code in e.snippets]
    if e.history.strip():
        head.append("# recent edits:\n" + "".join(f"# {ln}\n" for ln in e.history.splitlines()) + "\n")
    head.append(f"# file: {e.path}\n")
    return "".join(head) + e.before, ("\n" + e.after) if e.after else None
