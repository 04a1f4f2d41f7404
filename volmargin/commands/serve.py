"""The margin feed from the command line: ``volmargin keygen``, ``publish``, ``verify``, ``serve`` and ``watch``.

Input errors exit 2 with one line naming the field and value; a record that fails verification exits 1. The
signing key is read from ``--key`` or the file named by ``VOLMARGIN_SIGNING_KEY_FILE`` and never printed.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from volmargin.commands._common import console, err_console, user_errors

__all__ = ["register", "keygen", "publish", "verify", "serve", "watch"]

log = logging.getLogger("volmargin.serve")

_MARKETS_OPT = typer.Option(Path("configs/markets.yaml"), "--markets", help="Markets file (configs/markets.yaml).")


def _utc(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO-8601 time such as 2020-03-12 or 2020-03-12T00:00:00Z, "
                         f"got {value!r}") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _key_file(key: Path | None) -> Path:
    from serving.keys import KEY_ENV, key_path_from_env

    p = key or key_path_from_env()
    if p is None:
        raise ValueError(f"no signing key: pass --key FILE or set {KEY_ENV} (create one with `volmargin keygen`)")
    return p


@user_errors
def keygen(
    out: Path = typer.Option(..., "--out", help="Key file to create (mode 0600). Keep it out of the repository."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a new signing key and print its address (the key itself is never printed)."""
    from serving.keys import generate_key

    try:
        addr = generate_key(out, overwrite=force)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    typer.echo(addr)
    err_console.print(f"signing key written to {out} (mode 0600); signer address {addr}")


@user_errors
def publish(
    market: list[str] = typer.Option(..., "--market", help="Market id (repeat for several), e.g. BTC-PERP."),
    markets_file: Path = _MARKETS_OPT,
    as_of: str | None = typer.Option(None, "--as-of", help="Replay: use bars up to this UTC time (goes into the lineage)."),
    every: str | None = typer.Option(None, "--every", help="Publish repeatedly at this interval (15m, 1h ...)."),
    count: int | None = typer.Option(None, "--count", help="With --every: stop after this many rounds."),
    key: Path | None = typer.Option(None, "--key", help="Signing key file (default $VOLMARGIN_SIGNING_KEY_FILE)."),
    db: Path | None = typer.Option(None, "--db", help="Feed store (default feed.db of the markets file)."),
    as_json: bool = typer.Option(False, "--json", help="Print each stored record as JSON."),
) -> None:
    """Compute, control, sign and store the next record of each market (fallback parameters when the model or
    the input fails)."""
    from serving.keys import load_key
    from serving.markets import load_markets, parse_duration
    from serving.publish import publish_market
    from serving.store import FeedStore

    cfg = load_markets(markets_file)
    for m in market:
        cfg.market(m)
    t_as_of = _utc("--as-of", as_of)
    period = parse_duration(every, "--every") if every is not None else None
    if period is not None and period < 1:
        raise ValueError(f"--every must be at least 1s, got {every!r}")
    if count is not None and count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    k = load_key(_key_file(key))
    store = FeedStore(db or cfg.feed.db)
    rounds = 0
    while True:
        rounds += 1
        for m in market:
            res = publish_market(cfg, m, store, k, as_of=t_as_of)
            if res.record is None:
                console.print(f"{m}: not published ({res.skipped})")
                continue
            r = res.record
            msg = r["message"]
            if as_json:
                typer.echo(json.dumps(dict(r), indent=2))
            else:
                flag = f" [bold red]FALLBACK[/]: {r['fallback_reason']}" if r["fallback"] else ""
                pend = (f", MM {msg['mmRatePending'] / 1e8:.4%} from {r['params']['mm_effective_from']}"
                        if msg["mmRatePending"] else "")
                adj = f" (controls: {', '.join(r['adjustments'])})" if r["adjustments"] else ""
                fit = (r["lineage"].get("policy") or {}).get("fit") or {}
                how = {"fitted": "fitted", "cache": "from the cache, fitted"}.get(fit.get("source", ""))
                fitted = (f"; predictive parameters {how} on {fit['bars']} bars before {fit['cut']}" if how else "")
                console.print(f"{m} #{r['update_id']}: IM {msg['imRate'] / 1e8:.4%}, MM {msg['mmRate'] / 1e8:.4%}"
                              f"{pend}, valid until {r['valid_until']}{adj}{fitted}{flag}")
        if period is None or (count is not None and rounds >= count):
            break
        time.sleep(period)


@user_errors
def verify(
    record: Path = typer.Argument(..., help="A signed record (JSON, as GET /v1/params/{market} returns it)."),
    signer: str | None = typer.Option(None, "--signer", help="Expected signer address (default: the record's)."),
    markets_file: Path | None = typer.Option(None, "--markets", help="Also check the EIP-712 domain of this markets file."),
    check_expiry: bool = typer.Option(False, "--check-expiry", help="Fail when the record has expired now."),
) -> None:
    """Verify a record's signature, signer, hashes (and domain, expiry); exit 1 when it fails."""
    from serving.feed import VerificationError, verify_record
    from serving.markets import load_markets

    if not record.is_file():
        raise FileNotFoundError(f"record file not found: {record}")
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{record}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{record}: a record must be a JSON object, got {type(doc).__name__}")
    domain = load_markets(markets_file).domain() if markets_file else None
    try:
        rec = verify_record(doc, signer=signer, domain=domain, now=datetime.now(UTC) if check_expiry else None)
    except VerificationError as exc:
        err_console.print(f"[bold red]INVALID[/] {record}: {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    typer.echo(f"OK {rec.market} update {rec.update_id} signed by {doc.get('signer') if signer is None else signer}")


@user_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    markets_file: Path = _MARKETS_OPT,
    db: Path | None = typer.Option(None, "--db", help="Feed store (default feed.db of the markets file)."),
    rate: float | None = typer.Option(None, "--rate", help="Requests/s per client (default $VOLMARGIN_RATE_LIMIT or 2000)."),
    burst: int | None = typer.Option(None, "--burst", help="Token-bucket size per client (default 4000)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve the feed: GET /v1/params/{market}, /history, POST /v1/margin, /healthz, /readyz, /metrics, admin."""
    import uvicorn

    from serving.app import ServiceSettings, create_app
    from serving.markets import load_markets

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    cfg = load_markets(markets_file)
    settings = ServiceSettings.from_env(rate=rate, burst=burst)
    app = create_app(cfg, db or cfg.feed.db, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


@user_errors
def watch(
    market: str = typer.Option(..., "--market", help="Market id, e.g. BTC-PERP."),
    signer: str = typer.Option(..., "--signer", help="The feed's signer address; anything else is rejected."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Service URL."),
    interval: str = typer.Option("5s", "--interval", help="Poll interval."),
    count: int | None = typer.Option(None, "--count", help="Stop after this many polls (default: forever)."),
    markets_file: Path | None = typer.Option(None, "--markets", help="Check the domain and change controls of this markets file."),
) -> None:
    """Poll a market, verify signature, signer, expiry and update id; print accepted records, flag rejected ones.
    Exit 1 when the last poll was rejected."""
    from eth_utils import is_address

    from serving.client import FeedWatcher
    from serving.markets import load_markets, parse_duration

    if not is_address(signer):
        raise ValueError(f"--signer must be a 20-byte hex address, got {signer!r}")
    period = parse_duration(interval, "--interval")
    if count is not None and count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    domain = rules = None
    if markets_file is not None:
        cfg = load_markets(markets_file)
        domain, rules = cfg.domain(), cfg.market(market).rules()
    w = FeedWatcher(base_url=url, market=market, signer=signer, domain=domain, rules=rules)
    n = 0
    last = None
    while count is None or n < count:
        n += 1
        last = w.poll()
        if last.status == "accepted":
            m = last.record["message"] if last.record else {}
            typer.echo(f"accepted {market} #{last.update_id}: IM {m.get('imRate', 0) / 1e8:.4%} "
                       f"MM {m.get('mmRate', 0) / 1e8:.4%} fallback={m.get('fallback')}")
        elif last.status == "unchanged":
            typer.echo(f"unchanged {market} #{last.update_id}")
        else:
            err_console.print(f"[bold red]rejected[/] {market}: {last.reason}", highlight=False)
        if count is None or n < count:
            time.sleep(period)
    if last is not None and last.status == "rejected":
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``keygen``, ``publish``, ``verify``, ``serve`` and ``watch`` to the main app."""
    app.command("keygen", help="Write a new feed signing key (mode 0600) and print its address.")(keygen)
    app.command("publish", help="Publish signed margin parameters for markets.")(publish)
    app.command("verify", help="Verify a signed feed record.")(verify)
    app.command("serve", help="Serve the margin feed over HTTP (FastAPI + uvicorn).")(serve)
    app.command("watch", help="Poll and verify a market's feed.")(watch)
