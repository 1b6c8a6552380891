"""Layer selections as users write them: ``all``, ``6-18``, ``3,5,-1``."""

from __future__ import annotations

from steerlab.core.errors import SteerlabError


def _norm(index: int, num_layers: int) -> int:
    value = index + num_layers if index < 0 else index
    if not 0 <= value < num_layers:
        raise SteerlabError(
            f"layer {index} does not exist: this model has layers 0..{num_layers - 1} "
            f"(negative indices count from the end)"
        )
    return value


def resolve_layers(spec: str | int | list[int] | None, num_layers: int) -> list[int]:
    """Parse a layer selection: ``all``, ``6-18``, ``3,5,-1`` or a list of ints.

    Negative indices count from the end. The result is sorted and unique.

    Raises:
        SteerlabError: a malformed selection or a layer outside ``0..num_layers-1``.
    """
    if spec is None or spec == "all":
        return list(range(num_layers))
    items: list[int] = []
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, list):
        items = list(spec)
    else:
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    cut = part.index("-", 1)
                    lo, hi = int(part[:cut]), int(part[cut + 1 :])
                    lo, hi = _norm(lo, num_layers), _norm(hi, num_layers)
                    if hi < lo:
                        raise SteerlabError(f"layer range '{part}' is empty: write it low-high")
                    items.extend(range(lo, hi + 1))
                else:
                    items.append(int(part))
            except SteerlabError:
                raise
            except ValueError:
                raise SteerlabError(
                    f"cannot read layers '{spec}': use 'all', a range like 6-18, "
                    "or a list like 3,5,-1"
                ) from None
    out = sorted({_norm(i, num_layers) for i in items})
    if not out:
        raise SteerlabError(f"no layers selected by '{spec}': use 'all', 6-18 or 3,5")
    return out
