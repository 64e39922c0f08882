#!/usr/bin/env python3
"""Refreshes the bundled price table from the newest LiteLLM release on PyPI.

LiteLLM ships its price table inside its Python package, as
`litellm/model_prices_and_context_window_backup.json`. This script asks PyPI for the newest
release (or `--version`), downloads one of its wheels, checks the download against the sha256
PyPI publishes, and copies that file byte for byte over
`aggregator/pricing/model_prices_and_context_window.json`, with the licence next to it. It then
prints which models were added or removed and which changed a rate the aggregator prices with
(docs/pricing.md), and updates the provenance table of `aggregator/pricing/README.md`.

    scripts/refresh-prices.py              # newest release
    scripts/refresh-prices.py --version 1.110.2
    scripts/refresh-prices.py --dry-run    # print the differences, change nothing

Standard library only. Afterwards run `cargo test -p aggregator --lib pricing` (the
`bundled_*` tests pin a few real rates and the counts) and the end-to-end tests, then re-price
history with `aggregator replay` if you want past events priced anew (docs/replay.md).
"""

import argparse
import hashlib
import io
import json
import re
import sys
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRICING_DIR = ROOT / "aggregator" / "pricing"
TABLE = PRICING_DIR / "model_prices_and_context_window.json"
LICENSE = PRICING_DIR / "LICENSE-litellm"
README = PRICING_DIR / "README.md"
MEMBER = "litellm/model_prices_and_context_window_backup.json"

# The rates of the cost formula and their long-context and service-tier variants: what
# `parse_rate_key` in aggregator/src/pricing.rs reads. Every other field is ignored there.
RATE_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_creation_input_token_cost_above_1hr"
    r"|cache_creation_input_token_cost|cache_read_input_token_cost)"
    r"(_above_[0-9]+k_tokens)?(_priority|_flex)?$"
)


def fetch(url):
    request = urllib.request.Request(url, headers={"user-agent": "meter-refresh-prices"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read()


def release(version):
    """The release's version and files, from PyPI's JSON for the project (the newest release
    without `version`), with the file URLs made absolute (a mirror may give relative ones)."""
    url = "https://pypi.org/pypi/litellm/json"
    meta = json.loads(fetch(url))
    version = version or meta["info"]["version"]
    files = meta["urls"] if version == meta["info"]["version"] else meta["releases"].get(version)
    if not files:
        sys.exit(f"refresh-prices: PyPI has no files for LiteLLM {version}")
    for file in files:
        file["url"] = urllib.parse.urljoin(url, file["url"])
    return version, files


def pick_wheel(files):
    """Any wheel holds the same JSON; prefer a pure one, then the smallest."""
    wheels = [f for f in files if f["filename"].endswith(".whl") and not f.get("yanked")]
    if not wheels:
        sys.exit("refresh-prices: the release has no wheel")
    wheels.sort(key=lambda f: (not f["filename"].endswith("-none-any.whl"), f["size"]))
    return wheels[0]


def rates(entry):
    if not isinstance(entry, dict):
        return {}
    return {k: v for k, v in entry.items() if RATE_KEY.match(k)}


def priced(table):
    """Models the aggregator can price: an input or output rate in some form."""
    out = {}
    for name, entry in table.items():
        if name == "sample_spec":
            continue
        found = rates(entry)
        if any(k.startswith(("input_cost_per_token", "output_cost_per_token")) for k in found):
            out[name] = found
    return out


def describe_change(old, new):
    parts = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before != after:
            parts.append(f"{key} {before if before is not None else '-'} -> "
                         f"{after if after is not None else '-'}")
    return "; ".join(parts)


def update_readme(version, wheel, table_bytes, entries, priced_count):
    text = README.read_text()
    rows = [
        f"| source | LiteLLM {version}, the PyPI wheel `{wheel['filename']}` "
        f"(sha256 `{wheel['digests']['sha256']}`) |",
        f"| file in the wheel | `{MEMBER}` |",
        f"| copied | byte for byte, unmodified (sha256 "
        f"`{hashlib.sha256(table_bytes).hexdigest()}`, {len(table_bytes):,} bytes) |",
        f"| entries | {entries:,}, of which {priced_count:,} have token rates and can price an "
        f"event |",
    ]
    lines = text.split("\n")
    prefixes = ["| source |", "| file in the wheel |", "| copied |", "| entries |"]
    for prefix, row in zip(prefixes, rows):
        at = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
        if at is None:
            sys.exit(f"refresh-prices: {README} has no provenance row {prefix!r}")
        lines[at] = row
    licence_at = next(i for i, line in enumerate(lines) if line.startswith("| licence |"))
    lines[licence_at] = re.sub(r"litellm-[^/`]*\.dist-info", f"litellm-{version}.dist-info",
                               lines[licence_at])
    README.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="LiteLLM release to take (default: the newest)")
    parser.add_argument("--dry-run", action="store_true", help="print the differences only")
    args = parser.parse_args()

    version, files = release(args.version)
    wheel = pick_wheel(files)
    print(f"LiteLLM {version}: downloading {wheel['filename']} ({wheel['size']:,} bytes)",
          file=sys.stderr)
    data = fetch(wheel["url"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel["digests"]["sha256"]:
        sys.exit(f"refresh-prices: sha256 mismatch for {wheel['filename']}: got {digest}")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        try:
            table_bytes = archive.read(MEMBER)
        except KeyError:
            sys.exit(f"refresh-prices: {wheel['filename']} has no {MEMBER}")
        licence = next((n for n in archive.namelist()
                        if re.fullmatch(r"litellm-[^/]*\.dist-info/(licenses/)?LICENSE", n)),
                       None)
        licence_bytes = archive.read(licence) if licence else None

    new_table = json.loads(table_bytes)
    old_table = json.loads(TABLE.read_bytes())
    old, new = priced(old_table), priced(new_table)
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(m for m in set(old) & set(new) if old[m] != new[m])

    for model in added:
        print(f"+ {model}")
    for model in removed:
        print(f"- {model}")
    for model in changed:
        print(f"~ {model}: {describe_change(old[model], new[model])}")
    entries = len(new_table)
    print(f"LiteLLM {version}: {entries} entries, {len(new)} priced; "
          f"{len(added)} added, {len(removed)} removed, {len(changed)} changed price")

    if args.dry_run:
        return
    if table_bytes == TABLE.read_bytes():
        print("the bundled table is already this release's; nothing written")
        return
    TABLE.write_bytes(table_bytes)
    if licence_bytes is not None:
        LICENSE.write_bytes(licence_bytes)
    update_readme(version, wheel, table_bytes, entries, len(new))
    print(f"wrote {TABLE.relative_to(ROOT)}, {LICENSE.relative_to(ROOT)} and "
          f"{README.relative_to(ROOT)}; now run the tests (see the top of this script)")


if __name__ == "__main__":
    main()
