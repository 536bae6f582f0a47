"""The README's python blocks run as written, in order, in a fresh interpreter."""

import re
from pathlib import Path

from test_docs import python_blocks as page_blocks
from test_docs import run_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[dict]:
    return page_blocks(README)


def test_every_python_block_runs_in_order_as_written():
    """One namespace, as a reader pasting the blocks into one notebook would have; a subprocess, because blocks
    may change process-wide settings (``jdrop.masks.set_bits_lowering``), with the 8 CPU devices that the
    sequence-parallel recipe asks a CPU reader to simulate (``--xla_force_host_platform_device_count=8``)."""
    blocks = python_blocks()
    assert len(blocks) >= 4, "README.md lost python blocks"
    results = run_blocks(blocks, cwd=ROOT, timeout=600)
    loss, accuracy = results[0]["stdout"].split()  # the quickstart prints the loss and the eval accuracy
    assert float(loss) > 0.0
    assert 0.0 <= float(accuracy) <= 1.0


def test_readme_shows_the_two_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")
