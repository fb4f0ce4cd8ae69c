"""The package's public surface, as the README shows it, in a fresh interpreter."""
import subprocess
import sys


def test_import_gmoe_exposes_convert():
    """`import gmoe` alone must give gmoe.convert (the README calls gmoe.convert.from_gmoe_reference)."""
    code = "import gmoe; print(gmoe.convert.from_gmoe_reference.__name__, gmoe.convert.from_mixlora.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["from_gmoe_reference", "from_mixlora"]
