"""mkdocs hooks for the documentation site (``hooks:`` in mkdocs.yml).

A notebook's table of contents (mkdocs-jupyter) slugifies its headings with their inline code removed, while the
rendered notebook's headings keep it in their ids (``# `jdrop.train_step` in ...``): the sidebar's links would miss
their headings. The TOC lists the notebook's headings in document order, as the page does, so each entry takes the
id of the heading at its position.
"""

import re

HEADING_ID = re.compile(r"<h[1-6][^>]*\bid=\"([^\"]+)\"")


def _entries(toc):
    for entry in toc:
        yield entry
        yield from _entries(entry.children)


def on_page_context(context, page, config, nav):
    if not page.file.src_uri.endswith(".ipynb") or not page.content:
        return context
    ids = HEADING_ID.findall(page.content)
    entries = list(_entries(page.toc))
    if len(ids) == len(entries):
        for entry, heading_id in zip(entries, ids):
            entry.id = heading_id
    return context


# The docstrings are Google style with a few reST habits (``Example::``, ``:func:`name```); the API pages render
# them as Markdown, where ``Example::`` followed by ``>>>`` lines would become nested block quotes. This griffe
# extension (``extensions:`` in mkdocs.yml's mkdocstrings options) rewrites those habits as the Google style that
# mkdocstrings renders: an ``Examples:`` section (doctest lines become code), plain code for roles, one colon.

import griffe  # noqa: E402

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`~?([^`]+)`")
LITERAL_MARKER = re.compile(r"(\S)::$", re.MULTILINE)
EXAMPLE_HEADING = re.compile(r"^(\s*)Examples?::\s*$", re.MULTILINE)


class GoogleStyleDocstrings(griffe.Extension):
    """Rewrites reST roles and literal markers in docstrings into what the Google-style parser understands."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is None:
            return
        text = EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
        text = ROLE.sub(r"`\1`", text)
        obj.docstring.value = LITERAL_MARKER.sub(r"\1:", text)
