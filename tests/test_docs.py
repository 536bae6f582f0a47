"""The documentation site: every python block of every page runs, and the built site has no broken internal link.

Each page under ``docs/`` (the guides, the home page, any page added later) runs its ```` ```python ```` blocks
top to bottom in one fresh interpreter, as a reader pasting them into one notebook would, with the 8 simulated
CPU devices that the sequence-parallel guide asks a CPU reader for. A block that cannot run on a CPU-only machine
(it needs a GPU or TPU, or several hosts) is marked by an HTML comment on the line just above its fence, which the
site does not show::

    <!-- docs-test: skip (needs a GPU: Triton kernels) -->
    ```python
    ...
    ```

The reason in parentheses is required. A skipped block is still compiled, so a syntax error in it fails the page.
DeprecationWarnings raised by a page's own code or by jdrop are errors: the docs use no deprecated spelling.
"""

import html.parser
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
RUNNER = r"""
import contextlib, io, json, sys, traceback, warnings
warnings.filterwarnings("error", category=DeprecationWarning, module=r"(__docs__|jdrop(\..*)?)$")
blocks = json.load(sys.stdin)
namespace = {"__name__": "__docs__"}
for block in blocks:
    name = f"{block['page']}, python block at line {block['line']}"
    code = compile(block["code"], name, "exec")
    if block["skip"]:
        print(json.dumps({"line": block["line"], "skipped": block["skip"]}))
        continue
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
    except BaseException:
        print(json.dumps({"line": block["line"], "error": traceback.format_exc(), "stdout": out.getvalue()}))
        sys.exit(1)
    print(json.dumps({"line": block["line"], "stdout": out.getvalue()}))
"""


def python_blocks(page: Path, root: Path = ROOT) -> list[dict]:
    """The page's top-level ```python blocks: their first line (1-based), their code, and the skip reason if any
    (``page`` is named relative to ``root`` in tracebacks)."""
    lines = page.read_text().splitlines()
    blocks, number = [], 0
    while number < len(lines):
        if FENCE.match(lines[number]):
            start = number + 1
            end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{page}: the python block at line {start} is never closed"
            marker = SKIP.match(lines[number - 1].strip()) if number > 0 else None
            blocks.append({"page": str(page.relative_to(root)), "line": start + 1,
                           "code": "\n".join(lines[start:end]) + "\n",
                           "skip": marker.group("reason").strip() if marker else None})
            number = end
        elif "docs-test:" in lines[number] and not (number + 1 < len(lines) and FENCE.match(lines[number + 1])):
            raise AssertionError(f"{page}:{number + 1}: a docs-test marker must stand on the line just above a "
                                 "```python fence")
        number += 1
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def test_the_guides_have_code():
    guides = [p for p in PAGES if p.parent.name == "guides"]
    assert len(guides) >= 6, f"only {len(guides)} guides with python blocks: {guides}"


def test_skip_markers_are_recognised(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- docs-test: skip (needs a TPU) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n")
    blocks = python_blocks(page, root=tmp_path)
    assert [(b["line"], b["skip"]) for b in blocks] == [(4, "needs a TPU"), (8, None)]
    page.write_text("<!-- docs-test: skip (a marker away from its fence) -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="just above"):
        python_blocks(page, root=tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_python_block_runs_in_order(page, tmp_path):
    """A subprocess per page: blocks may change process-wide settings (``jdrop.masks.set_bits_lowering``) and
    the page asks for 8 CPU devices; the working directory is a temporary one, for what a page writes."""
    blocks = python_blocks(page)
    run_blocks(blocks, cwd=tmp_path, timeout=900)


def run_blocks(blocks: list[dict], cwd: Path, timeout: int) -> list[dict]:
    """Runs ``blocks`` (from :func:`python_blocks`) in order in one namespace, in a fresh Python with 8 CPU devices;
    asserts every block ran and returns one record (``stdout``, or ``skipped``) per block."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if "error" in r]
    assert not failed and done.returncode == 0, (failed[0]["error"] + failed[0]["stdout"][-2000:] if failed
                                                 else done.stderr[-3000:])
    assert len(results) == len(blocks)
    return results


class _Links(html.parser.HTMLParser):
    """The href/src of every tag of one HTML page, and the ids (and ``<a name>``) it defines."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for attribute in ("href", "src"):
            if values.get(attribute):
                self.links.append(values[attribute])
        for attribute in ("id", "name") if tag == "a" else ("id",):
            if values.get(attribute):
                self.ids.add(values[attribute])


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return parser


def _target(site: Path, page: Path, link: str) -> tuple[Path, str]:
    """The built file a relative link points to (a folder means its index.html), and its fragment."""
    parts = urllib.parse.urlsplit(link)
    path = urllib.parse.unquote(parts.path)
    target = (page if not path else (site / path.lstrip("/") if path.startswith("/") else page.parent / path))
    target = target.resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, urllib.parse.unquote(parts.fragment)


def test_the_built_site_has_no_broken_internal_link(tmp_path):
    """Builds the site strictly, then resolves every relative href/src of every built page against the built
    files, and every #fragment against the ids of its target page. External links are listed, never fetched."""
    site = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 20, [str(p.relative_to(site)) for p in pages]
    parsed = {page.resolve(): _parse(page) for page in pages}
    broken, external = [], set()
    for page, links in parsed.items():
        for link in links.links:
            scheme = urllib.parse.urlsplit(link).scheme
            if scheme == "data":  # an image inlined in a rendered notebook
                continue
            if scheme or link.startswith("//"):
                external.add(link)
                continue
            target, fragment = _target(site, page, link)
            where = f"{page.relative_to(site.resolve())}: {link}"
            if not target.exists():
                broken.append(f"{where} (no file {target})")
            elif fragment and target.suffix == ".html" and fragment not in parsed[target].ids:
                broken.append(f"{where} (no id {fragment!r} in {target.name})")
    print(f"{len(external)} external links, not fetched:", *sorted(external), sep="\n  ")
    assert not broken, "\n".join(broken)


PRIVATE_HISTORY = re.compile(r"\b[Ii]ssues? \d+|\bthe seed\b|\bseed's\b|\bthe issue's\b")


def test_user_facing_pages_speak_without_private_history():
    """The README and the site's own pages describe the library, not the project's history (issue numbers, "the
    seed"). BENCHMARKS.md, a lab notebook included as it is, is not checked."""
    pages = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if p.name != "benchmarks.md")]
    found = [f"{page.relative_to(ROOT)}:{number}: {line.strip()}" for page in pages
             for number, line in enumerate(page.read_text().splitlines(), 1) if PRIVATE_HISTORY.search(line)]
    assert not found, "\n".join(found)
