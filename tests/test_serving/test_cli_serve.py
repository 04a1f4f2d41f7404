"""``volmargin keygen / publish / verify / watch`` (exit 2 naming field and value; exit 1 for a bad record)."""

from __future__ import annotations

import json
import stat

import typer
from serving_test_helpers import ADDRESS, markets_doc, write_yaml
from typer.testing import CliRunner

from volmargin.commands import serve as serve_cmd

app = typer.Typer()


@app.callback()
def _cb() -> None:
    pass


serve_cmd.register(app)
runner = CliRunner()


def flat(r) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(r.output.split())


def test_keygen_mode_0600_and_no_overwrite(tmp_path):
    out = tmp_path / "keys" / "feed.key"
    r = runner.invoke(app, ["keygen", "--out", str(out)])
    assert r.exit_code == 0 and r.stdout.strip().startswith("0x")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() not in r.output
    r = runner.invoke(app, ["keygen", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in flat(r)


def test_publish_and_verify(tmp_path, cache_dir, key_file):
    mf = write_yaml(tmp_path / "markets.yaml", markets_doc(tmp_path, cache_dir))
    r = runner.invoke(app, ["publish", "--markets", str(mf), "--market", "NOPE", "--key", str(key_file)])
    assert r.exit_code == 2 and "unknown market 'NOPE'" in flat(r)
    r = runner.invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PERP", "--key", str(key_file),
                            "--as-of", "yesterday"])
    assert r.exit_code == 2 and "--as-of must be an ISO-8601 time" in flat(r)
    key_file.chmod(0o644)
    r = runner.invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PERP", "--key", str(key_file)])
    assert r.exit_code == 2 and "must not be readable by group or others" in flat(r)
    key_file.chmod(0o600)
    r = runner.invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PERP", "--key", str(key_file),
                            "--as-of", "2020-03-12", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps(doc))
    r = runner.invoke(app, ["verify", str(rec), "--signer", ADDRESS, "--markets", str(mf)])
    assert r.exit_code == 0 and "OK ETH-PERP update 1" in r.stdout
    doc["message"]["imRate"] += 1
    rec.write_text(json.dumps(doc))
    r = runner.invoke(app, ["verify", str(rec)])
    assert r.exit_code == 1 and "tampered" in flat(r)
    rec.write_text("{oops")
    r = runner.invoke(app, ["verify", str(rec)])
    assert r.exit_code == 2 and "invalid JSON at line 1" in flat(r)
    r = runner.invoke(app, ["watch", "--market", "ETH-PERP", "--signer", "nope"])
    assert r.exit_code == 2 and "--signer must be a 20-byte hex address, got 'nope'" in flat(r)


def test_markets_file_errors(tmp_path, cache_dir):
    doc = markets_doc(tmp_path, cache_dir)
    doc["markets"]["ETH-PERP"]["controls"]["max_change"] = 1.5
    mf = write_yaml(tmp_path / "m.yaml", doc)
    r = runner.invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PERP", "--key", "x"])
    assert r.exit_code == 2 and "controls.max_change must be in (0, 1), got 1.5" in flat(r)
    r = runner.invoke(app, ["publish", "--markets", str(tmp_path / "none.yaml"), "--market", "ETH-PERP"])
    assert r.exit_code == 2 and "markets file not found" in flat(r)
