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
