"""--template: a Jinja file that renders each line's prompt from the line's JSON fields."""
from __future__ import annotations

import re
from pathlib import Path

import jinja2

from flashgen.jobs.errors import FatalError
from flashgen.jobs.params import BadLine


def load_template(path: str) -> jinja2.Template:
    """Compile the template once, before the model loads, so a typo costs seconds rather than a model load."""
    p = Path(path)
    if not p.is_file():
        raise FatalError(f"template {path} does not exist; check the --template path")
    # StrictUndefined: a field missing from a line is that line's error, never a silently empty prompt.
    # trim_blocks/lstrip_blocks as in HF chat templates: {# comments #} and {% tags %} on their own lines leave
    # no blank lines in the prompt. The file's final newline is dropped (keep_trailing_newline=False).
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(p.parent)), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, autoescape=False,
    )
    try:
        return env.get_template(p.name)
    except jinja2.TemplateSyntaxError as e:
        raise FatalError(f"template {path}, line {e.lineno}: {e.message}; fix the template") from None
    except UnicodeDecodeError:
        raise FatalError(f"template {path} is not UTF-8 text; save it as UTF-8") from None


_UNDEFINED = re.compile(r"'([^']+)' is undefined|has no attribute '([^']+)'")


def render(template: jinja2.Template, name: str, obj: dict) -> str:
    try:
        return template.render(**{k: v for k, v in obj.items() if isinstance(k, str)})
    except jinja2.UndefinedError as e:
        m = _UNDEFINED.search(str(e))
        field = (m.group(1) or m.group(2)) if m else None
        what = f'field "{field}"' if field else f"a field ({e})"
        raise BadLine(
            "template_missing_field",
            f"template {name} uses {what}, which this line lacks; add it to the line or change the template",
            field,
        ) from None
    except Exception as e:  # a template that fails on some values (e.g. a filter on the wrong type)
        raise BadLine("template_error", f"template {name} failed on this line: {type(e).__name__}: {e}") from None
