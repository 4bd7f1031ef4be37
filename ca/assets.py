"""An asset list (CSV from a hospital's asset management system) read into devices: every row
validated with the registration rules (ca/registry.py new_device) before anything is written,
every error named by its line. The CLI's `device import` and the console's import preview read
it the same way."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from .errors import BadRequestError
from .model import Device
from .registry import new_device

REQUIRED_COLUMNS = ("device_id", "model", "owner")
OPTIONAL_COLUMNS = ("location", "criticality", "firmware", "manufacturer", "serial_number", "udi", "asset_tag")
MAX_ERRORS = 200   # a file that is wrong everywhere: the first ones say enough


@dataclass
class AssetList:
    devices: list[Device] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)          # "line N: what is wrong"
    ignored_columns: list[str] = field(default_factory=list)

    def check(self) -> list[Device]:
        """The devices, or BadRequestError listing the errors (the first ones)."""
        if self.errors:
            shown = self.errors[:10]
            more = f"\n... and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
            raise BadRequestError("\n".join(shown) + more)
        return self.devices


def read_asset_csv(text: str) -> AssetList:
    out = AssetList()
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        out.errors.append(f"line 1: missing column(s) {', '.join(missing)}; "
                          f"expected {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
        return out
    out.ignored_columns = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    reader.fieldnames = header
    seen: dict[str, int] = {}
    try:
        for row in reader:
            if len(out.errors) >= MAX_ERRORS:
                break
            line = reader.line_num
            if None in row:
                out.errors.append(f"line {line}: more fields than columns")
                continue
            values = {k: (v or "").strip() for k, v in row.items() if k in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
            try:
                device = new_device(values.pop("device_id", ""), **values)
            except BadRequestError as exc:
                out.errors.append(f"line {line}: {exc}")
                continue
            if device.id in seen:
                out.errors.append(f"line {line}: device {device.id} already appears on line {seen[device.id]}")
                continue
            seen[device.id] = line
            out.devices.append(device)
    except csv.Error as exc:
        out.errors.append(f"line {reader.line_num}: {exc}")
    if not out.devices and not out.errors:
        out.errors.append("the file has no device rows")
    return out
