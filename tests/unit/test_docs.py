"""docs/ARCHITECTURE.md stays true to the code: every file it names exists, and every
`file::Symbol.attr` it names is defined there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def _path(ref: str) -> Path:
    return ROOT / ref.replace("msr/", "megatron_selfroute/", 1)


def test_every_named_file_exists():
    refs = set(re.findall(r"`((?:msr|tools|tests|docs)/[\w/.{},]+?\.(?:py|md|sh))", DOC))
    refs |= {r for r in re.findall(r"`((?:pretrain_\w+)\.py)", DOC)}
    assert len(refs) > 20
    missing = []
    for ref in refs:
        m = re.fullmatch(r"(.*)\{([\w,]+)\}(.*)", ref)
        expanded = [m.group(1) + x + m.group(3) for x in m.group(2).split(",")] if m else [ref]
        missing += [e for e in expanded if not _path(e).is_file()]
    assert not missing, missing


def test_every_named_symbol_is_defined():
    refs = re.findall(r"`((?:msr/|pretrain_)[\w/.]+\.py)::([\w.]+)", DOC)
    assert len(refs) > 5
    for path, symbol in refs:
        text = _path(path).read_text()
        for part in symbol.split("."):
            assert re.search(rf"^\s*(def|class) {part}\b|^{part}\s*[:=]", text, re.M), \
                (path, symbol)
