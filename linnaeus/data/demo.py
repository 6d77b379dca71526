"""The built-in demo dataset: procedurally drawn "organisms" with a 4-rank taxonomy and metadata.

Visual traits follow the tree, so every rank is learnable from the image:

- order (``taxa_L40``) sets the background tint,
- family (``taxa_L30``) sets the body shape,
- genus (``taxa_L20``) sets the body pattern,
- species (``taxa_L10``) sets the body colour.

Some species are *visual twins*: two species of one genus drawn identically, told apart only by one
metadata component — hemisphere (``borealis``/``australis``), season (``aestiva``/``hiemalis``) or
elevation (``montana``/``campestris``). A model with metadata can separate them and one without
cannot, which is why metadata-on beats metadata-off on this data, as it does on real observation
data. About 10% of each metadata component is missing, 5% of species labels and 2% of genus labels
are unknown (partial labels), so the null paths are exercised.

The dataset is generated once per cache folder (``ensure_demo_dataset``), atomically and under a
file lock, so parallel jobs of a sweep can share it.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from linnaeus.data.writer import RawMetadata, TaxonRow, write_images_h5, write_labels_h5
from linnaeus.errors import OutputError, describe_write_error

log = logging.getLogger(__name__)

DEMO_VERSION = 2  # 2: images.h5 in the contiguous layout
IMAGE_SIZE = 48
IMAGES_PER_SPECIES = 100
MISSING_META = 0.10
UNKNOWN_SPECIES = 0.05
UNKNOWN_GENUS = 0.02

ORDERS = ["Lucidoptera", "Umbraformes", "Viridales"]
FAMILIES = ["Lucidae", "Aurinidae", "Umbridae", "Noctuliidae", "Viridaceae", "Silvanidae"]
GENERA = ["Lampyra", "Fulgora", "Aurelia", "Chrysa", "Umbrix", "Tenebra",
          "Noctula", "Vespera", "Viridia", "Herbana", "Silvia", "Frondosa"]  # fmt: skip
PLAIN_EPITHETS = ["rubra", "caerulea", "flava", "nigra", "alba", "viridis", "aurea", "purpurea",
                  "fusca", "grisea", "rosea", "cinerea"]  # fmt: skip
TWIN_EPITHETS = {
    "spatial": ("borealis", "australis"),
    "temporal": ("aestiva", "hiemalis"),
    "elevation": ("montana", "campestris"),
}
ORDER_TINTS = np.array([[70, 60, 40], [30, 40, 70], [45, 70, 45]], dtype=np.float32)
SHAPES = ["disc", "square", "triangle", "diamond", "ring", "cross"]
PATTERNS = ["solid", "stripes", "dots", "checker"]


@dataclass
class Species:
    taxon_id: int
    name: str
    order: int
    family: int
    genus: int
    colour: np.ndarray  # (3,) RGB body colour
    lat: float
    lon: float
    peak_day: float
    elevation: float


def _species_list(rng: np.random.Generator) -> list[Species]:
    """30 species in 12 genera; the 3-species genera and every other 2-species genus hold a twin pair."""
    species: list[Species] = []
    twin_kinds = list(TWIN_EPITHETS)
    num_twins = 0
    plain = iter(PLAIN_EPITHETS * 3)
    for genus, genus_name in enumerate(GENERA):
        family = genus // 2
        order = family // 2
        size = 3 if genus % 2 == 0 else 2
        has_twins = size == 3 or genus % 4 == 1
        hues = rng.permutation(np.linspace(0, 1, 6, endpoint=False))[:size]
        members = []
        for k in range(size):
            colour = _hsv_to_rgb(hues[k], 0.85, 0.95)
            members.append(
                dict(
                    colour=colour,
                    lat=rng.uniform(-50, 50),
                    lon=rng.uniform(-150, 150),
                    peak_day=rng.uniform(1, 366),
                    elevation=rng.uniform(100, 2500),
                    epithet=next(plain),
                )
            )
        if has_twins:
            kind = twin_kinds[num_twins % len(twin_kinds)]
            num_twins += 1
            a, b = members[0], members[1]
            b.update(colour=a["colour"], lat=a["lat"], lon=a["lon"], peak_day=a["peak_day"])
            b["elevation"] = a["elevation"]
            a["epithet"], b["epithet"] = TWIN_EPITHETS[kind]
            if kind == "spatial":
                a["lat"], b["lat"] = 35.0, -35.0
            elif kind == "temporal":
                b["peak_day"] = (a["peak_day"] + 182) % 365 + 1
            else:
                a["elevation"], b["elevation"] = 2300.0, 300.0
        for m in members:
            species.append(
                Species(
                    taxon_id=1000 + len(species),
                    name=f"{genus_name} {m['epithet']}",
                    order=order,
                    family=family,
                    genus=genus,
                    colour=m["colour"],
                    lat=m["lat"],
                    lon=m["lon"],
                    peak_day=m["peak_day"],
                    elevation=m["elevation"],
                )
            )
    return species


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Body mask from coordinates centred on the body and scaled so the body spans about [-1, 1]."""
    if shape == "disc":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return (v <= 0.7) & (v >= 1.6 * np.abs(u) - 0.9)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1) & (r2 >= 0.3)
    return (np.abs(u) <= 0.3) & (np.abs(v) <= 1) | (np.abs(v) <= 0.3) & (np.abs(u) <= 1)  # cross


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Multiplicative brightness pattern on the body."""
    if pattern == "solid":
        return np.ones_like(u)
    if pattern == "stripes":
        return 0.55 + 0.45 * (np.sin(u * 9) > 0)
    if pattern == "dots":
        return 1.0 - 0.45 * ((np.sin(u * 8) * np.sin(v * 8)) > 0.5)
    return 0.55 + 0.45 * ((np.sin(u * 6) * np.sin(v * 6)) > 0)  # checker


def draw(sp: Species, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of a species, with random pose, scale, lighting and noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.22, 0.34) * size
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    mask = _shape_mask(SHAPES[sp.family], u, v)
    body = sp.colour * _pattern(PATTERNS[sp.genus % len(PATTERNS)], u, v)[..., None]
    background = ORDER_TINTS[sp.order] * rng.uniform(0.7, 1.3) + 25 * np.sin(
        (x * rng.uniform(-0.3, 0.3) + y * rng.uniform(-0.3, 0.3))[..., None]
    )
    image = np.where(mask[..., None], body * rng.uniform(0.75, 1.1), background)
    image += rng.normal(0, 14, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _observations(sp: Species, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Where, when and how high each observation of a species was made (unit: deg, day, metre)."""
    lat = np.clip(sp.lat + rng.normal(0, 8, n), -89, 89)
    lon = (sp.lon + rng.normal(0, 12, n) + 180) % 360 - 180
    day = (sp.peak_day - 1 + rng.normal(0, 30, n)) % 365 + 1
    elevation = np.maximum(sp.elevation + rng.normal(0, 250, n), 0)
    return {"lat": lat, "lon": lon, "day": day, "elevation": elevation}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_demo_dataset(
    out_dir: str | Path, seed: int = 0, images_per_species: int = IMAGES_PER_SPECIES
) -> Path:
    """Write ``labels.h5`` and ``images.h5`` of the demo dataset into ``out_dir``."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    species = _species_list(rng)

    taxonomy = [TaxonRow(100 + o, 40, 0, name) for o, name in enumerate(ORDERS)]
    taxonomy += [TaxonRow(200 + f, 30, 100 + f // 2, name) for f, name in enumerate(FAMILIES)]
    taxonomy += [TaxonRow(300 + g, 20, 200 + g // 2, name) for g, name in enumerate(GENERA)]
    taxonomy += [TaxonRow(sp.taxon_id, 10, 300 + sp.genus, sp.name) for sp in species]

    rows = [sp for sp in species for _ in range(images_per_species)]
    n = len(rows)
    order = rng.permutation(n)  # interleave species so row order carries no label information
    rows = [rows[i] for i in order]
    identifiers = [f"demo_{i:05d}.png" for i in range(n)]
    taxa = {
        "taxa_L40": np.array([100 + sp.order for sp in rows]),
        "taxa_L30": np.array([200 + sp.family for sp in rows]),
        "taxa_L20": np.array([300 + sp.genus for sp in rows]),
        "taxa_L10": np.array([sp.taxon_id for sp in rows]),
    }
    unknown_genus = rng.random(n) < UNKNOWN_GENUS
    unknown_species = unknown_genus | (rng.random(n) < UNKNOWN_SPECIES)
    taxa["taxa_L20"][unknown_genus] = 0
    taxa["taxa_L10"][unknown_species] = 0

    obs = {k: np.empty(n) for k in ("lat", "lon", "day", "elevation")}
    for sp in species:
        members = np.array([i for i, r in enumerate(rows) if r is sp])
        for key, values in _observations(sp, rng, len(members)).items():
            obs[key][members] = values
    for keys in (("lat", "lon"), ("day",), ("elevation",)):
        missing = rng.random(n) < MISSING_META
        for key in keys:
            obs[key][missing] = np.nan
    dates = [
        "" if np.isnan(d) else str(np.datetime64("2021-01-01") + np.timedelta64(int(d) - 1, "D"))
        for d in obs["day"]
    ]
    raw = RawMetadata(
        lat=obs["lat"], lon=obs["lon"], day_of_year=obs["day"], elevation=obs["elevation"], dates=dates
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_images_h5(out_dir / "images.h5", identifiers, (_png(draw(sp, rng)) for sp in rows))
    write_labels_h5(
        out_dir / "labels.h5",
        identifiers,
        taxa,
        taxonomy=taxonomy,
        raw=raw,
        config={"generator": "linnaeus.data.demo", "version": DEMO_VERSION, "seed": seed},
    )
    return out_dir


def demo_damage(folder: str | Path) -> str | None:
    """Why the demo dataset in ``folder`` is unusable (missing, truncated, older version), or None if intact.

    Cheap: reads the labels, matches them to the images file and decodes its first and last image.
    """
    from linnaeus.data.images import open_image_store
    from linnaeus.data.labels import read_labels

    folder = Path(folder)
    if not (folder / "labels.h5").is_file() or not (folder / "images.h5").is_file():
        return "files missing"
    try:
        table = read_labels(folder / "labels.h5")
        if (table.config or {}).get("version") != DEMO_VERSION:
            return f"made by another version (want {DEMO_VERSION})"
        store = open_image_store(folder / "images.h5")
        rows, missing = store.rows_for(table.identifiers)
        if len(rows) == 0 or missing.any():
            return f"{int(missing.sum())} images missing from images.h5"
        for i in (0, len(rows) - 1):
            store.read(int(rows[i]), str(table.identifiers[i]))
    except Exception as err:  # any failure to read means: generate it again
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def ensure_demo_dataset(cache_dir: str | Path, seed: int = 0) -> Path:
    """The demo dataset folder inside ``cache_dir``, generated on first use and again when damaged.

    Safe under concurrency: one process generates while the others wait on a lock file, and the
    folder appears under its final name only when complete. A damaged copy (a truncated file, an
    interrupted copy of the cache) is detected and regenerated with a warning.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / (f"demo-v{DEMO_VERSION}" + ("" if seed == 0 else f"-seed{seed}"))
    if demo_damage(final) is None:
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = demo_damage(final)
        if damage is not None:
            if final.exists():
                log.warning("the demo dataset in %s is damaged (%s); generating it again", final, damage)
            else:
                log.info("generating the demo dataset into %s (once)", final)
            tmp = cache_dir / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                generate_demo_dataset(tmp, seed)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except OSError as err:
                raise OutputError(
                    describe_write_error(err, cache_dir, "the demo dataset into")
                    + " (or point data.cache_dir / LINNAEUS_CACHE elsewhere)"
                ) from err
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final
