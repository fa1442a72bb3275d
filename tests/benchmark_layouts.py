"""Tiny copies of the benchmarks of evaluation/benchmarks.py, in the layouts their tools write.

Each writer names the script and lines whose output it copies: gmberton/VPR-datasets-downloader
at 2f886d5 (its util.py, format_*.py, download_*.py), or at 3250f89 for download_nordland.py,
download_st_lucia.py and download_eynsham.py, which 3aa6613 removed when the three sets moved
to rsync.  Folder names, the number format of util.format_coord and what each script puts in
each "@" field are copied; the images are tiny JPEGs and the positions are chosen so that the
right answers are known by construction.  SF-XL and the SVOX archive are not built by a script:
SF-XL's names follow its README (@...@pano_id@@heading@@@@timestamp@@.jpg) and the copies of its
names in OliverGrainge/TeTRA-VPR's dataloaders/val/image_paths/sf_xl_small_*.npy; no copy of an
SVOX name was found, so SVOX is written in the downloader's name format.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placeforge.evaluation.benchmarks import BENCHMARKS
from placeforge.geo import latlon_to_utm, utm_to_latlon
from tests.conftest import jpeg_bytes

# A street: database images along the easting, queries beside them.  With these offsets the
# query at 5 m has database images 0 and 1 (5 and 15 m away; 35 m is out), the one at 50 m
# images 2 and 3, and the one at 130 m none; no distance is near 25 m.
DB_OFFSETS_M = (0.0, 20.0, 40.0, 60.0, 200.0)
Q_OFFSETS_M = (5.0, 50.0, 130.0)
STREET_POSITIVES = [[0, 1], [2, 3], []]
SVOX_QUERIES = ("queries", "queries_night", "queries_overcast", "queries_rain", "queries_snow", "queries_sun")
SF_XL_QUERIES = ("queries_v1", "queries_v2", "queries_night", "queries_occlusion")


@dataclass(frozen=True)
class Written:
    root: Path  # ROOT of "NAME:ROOT"
    database_count: int
    positives: list[list[int]]  # per query, in path order: the database rows (path order) that are right


# --- names as the tools write them --------------------------------------------------------------

def coord(value: float, left: int, right: int) -> str:
    """util.format_coord (util.py:26-36): `left` integer digits (sign included), zero-padded."""
    return f"{float(value):0={left + right + 1}.{right}f}"


def dst_name(lat: float, lon: float, pano_id: str, tile_num: int | None = None, heading: float | None = None,
             pitch: float | None = None, timestamp: str | None = None, note: str | None = None) -> str:
    """util.get_dst_image_name (util.py:42-66): UTM from full-precision lat/lon with 2 decimals,
    lat/lon with 5, tile 2 digits, heading and pitch 3, roll and height always empty."""
    utm = latlon_to_utm(np.array([lat]), np.array([lon]))
    east, north, zone, letter = utm.east_m[0], utm.north_m[0], int(utm.zone_number[0]), str(utm.zone_letter[0])
    tile = "" if tile_num is None else f"{int(float(tile_num)):02d}"
    head = "" if heading is None else f"{int(float(heading)):03d}"
    tilt = "" if pitch is None else f"{int(float(pitch)):03d}"
    return (f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@{zone:02d}@{letter}@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}"
            f"@{pano_id}@{tile}@{head}@{tilt}@@@{timestamp or ''}@{note or ''}@.jpg")


def pitts_name(lat: float, lon: float, source: str) -> str:
    """format_pitts30k.py:30-37 (format_pitts250k.py:30-37 alike) for a Pittsburgh file such as
    000/000829_pitch1_yaw1.jpg: pano_id before the first "_", tile (pitch-1)*24 + yaw-1, note
    "pitch<p>_yaw<y>"."""
    name = os.path.basename(source)
    pitch = int(re.findall(r"pitch(\d+)_", name)[0]) - 1
    yaw = int(re.findall(r"yaw(\d+)\.", name)[0]) - 1
    return dst_name(lat, lon, name.split("_")[0], tile_num=pitch * 24 + yaw, note=re.findall(r"_(.+)\.jpg", name)[0])


def tokyo_database_name(lat: float, lon: float, source: str) -> str:
    """format_tokyo247.py:77-83 for a database file <22-character pano id>_012_<heading>.png:
    pano_id its first 22 characters, tile heading // 30."""
    return dst_name(lat, lon, source[:22], tile_num=int(re.findall(r"_012_(\d+)\.png", source)[0]) // 30)


def tokyo_query_name(lat: float, lon: float, csv_first_field: str) -> str:
    """format_tokyo247.py:103-106: pano_id is the first field of the query's .csv, the image file
    name (e.g. 00399.jpg); line 105 replaces ",jpg", so the name keeps ".jpg" inside field 7:
    @...@00399.jpg@@@@@@@@.jpg."""
    return dst_name(lat, lon, csv_first_field.replace(",jpg", ""))


def msls_name(lat: float, lon: float, key: str, captured_at: str, night: bool, view: str, city: str) -> str:
    """format_mapillary.py:40-47: pano_id the Mapillary key, timestamp the capture date without
    "-", note <day|night>_<view direction, lower case>_<city>."""
    note = f"{'night' if night else 'day'}_{view.lower()}_{city}"
    return dst_name(lat, lon, key, timestamp=captured_at.replace("-", ""), note=note)


def nordland_name(frame: int) -> str:
    """download_nordland.py:30-32, 75-76 (at 3250f89): mock coordinates, frames 25 / 10.5 m apart
    along the northing (so frames within 10 are within 25 m), numbered from 0 on each side."""
    return f"@0@{coord(frame * 25 / 10.5, 5, 1)}@@@@@{frame}@@@@@@@@.jpg"


def pair_name(stem: str) -> str:
    """download_amstertime.py:48-51 and download_sped.py:33-34: a query and its database twin
    share the name; the pair's number times 1000 in field 2, the file stem in field 7."""
    return f"@0@{int(stem) * 1000}@@@@@{stem}@@@@@@@@.jpg"


def sf_xl_name(lat: float, lon: float, pano_id: str, heading: int | None, timestamp: str,
               plain_latlon: bool = False, east_north: tuple[float, float] | None = None) -> str:
    """SF-XL's README: @east@north@zone@letter@lat@lon@pano_id@@heading@@@@timestamp@@.jpg with the
    heading unpadded (TeTRA-VPR's copy: ...@91v00dfETJ4DjDI7udN8xg@@150@@@@201904@@.jpg), empty for
    queries_v1 (...@51321055860@@@@@@20210718@@.jpg).  `plain_latlon`: lat/lon unpadded, lat with
    6 decimals, and `east_north`: UTM fields that are not those of lat/lon, as a published
    queries_night name has them (@0543030.55@4180984.98@10@S@37.775128@-122.51158@...: its lat/lon
    lie 19 m from its UTM fields)."""
    utm = latlon_to_utm(np.array([lat]), np.array([lon]))
    east, north = east_north if east_north is not None else (utm.east_m[0], utm.north_m[0])
    zone, letter = int(utm.zone_number[0]), str(utm.zone_letter[0])
    latlon = f"{lat:.6f}@{lon:.5f}" if plain_latlon else f"{coord(lat, 3, 5)}@{coord(lon, 4, 5)}"
    head = "" if heading is None else str(heading)
    return f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@{zone}@{letter}@{latlon}@{pano_id}@@{head}@@@@{timestamp}@@.jpg"


# Where the published queries_night name's lat/lon lie from its UTM fields, metres east and north.
SF_XL_NIGHT_LATLON_OFFSET_M = (-17.84, -7.19)


# --- writing ------------------------------------------------------------------------------------

def latlon_at(east: float, north: float, zone: int, northern: bool) -> tuple[float, float]:
    lat, lon, ok = utm_to_latlon(np.array([east]), np.array([north]), np.array([zone]), np.array([northern]))
    assert ok[0]
    return float(lat[0]), float(lon[0])


def write_images(folder: Path, names: list[str], first_seed: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [jpeg_bytes(first_seed + i, (64, 48)) for i in range(len(names))]
    for name, data in zip(names, images):
        (folder / name).write_bytes(data)
    return images


def street(folder: Path, zone: int, northern: bool, origin: tuple[float, float], offsets: tuple[float, ...],
           first_seed: int, name_of) -> list[str]:
    """Images at `offsets` metres east of `origin`; name_of(lat, lon, i) names the i-th."""
    names = [name_of(*latlon_at(origin[0] + d, origin[1], zone, northern), i) for i, d in enumerate(offsets)]
    write_images(folder, names, first_seed)
    return names


def _pitts():
    def database(lat, lon, i):
        return pitts_name(lat, lon, f"000/{829 + i:06d}_pitch1_yaw{i + 1}.jpg")

    def queries(lat, lon, i):
        return pitts_name(lat, lon, f"queries_real/000/{546 + i:06d}_pitch2_yaw{12 - i}.jpg")
    return database, queries


# benchmark: (UTM zone, northern, origin east/north, database namer, queries namer)
UTM_SETS = {
    "pitts30k": (17, True, (584_100.0, 4_477_200.0), *_pitts()),
    "pitts250k": (17, True, (585_300.0, 4_476_400.0), *_pitts()),
    "tokyo247": (54, True, (381_900.0, 3_946_300.0),
                 lambda lat, lon, i: tokyo_database_name(lat, lon, f"-ZDuRB53cM_6gmXhpKU0Z{i}_012_{30 * i:03d}.png"),
                 lambda lat, lon, i: tokyo_query_name(lat, lon, f"{399 + i:05d}.jpg")),
    # download_san_francisco.py:42-45 (database: pano, tile, heading, pitch of the PCI name) and
    # 73-78 (queries: the image id and a heading from the pose quaternion).
    "san-francisco": (10, True, (551_000.0, 4_180_000.0),
                      lambda lat, lon, i: dst_name(lat, lon, f"pci8y{i}", tile_num=i + 1, heading=30 * i, pitch=4),
                      lambda lat, lon, i: dst_name(lat, lon, f"{1021 + i:04d}", heading=271.7 + i)),
    # download_st_lucia.py:53-69 (at 3250f89): negative latitude, pano_id <sequence>_<frame, 5 digits>.
    "st-lucia": (56, False, (502_000.0, 6_960_000.0),
                 lambda lat, lon, i: dst_name(lat, lon, f"100909_0845_{12 + 7 * i:05d}"),
                 lambda lat, lon, i: dst_name(lat, lon, f"180809_1545_{40 + 9 * i:05d}")),
    # download_eynsham.py:44-55 (at 3250f89): pano number 4 digits (database below 4787), tile
    # 0..4, timestamp YYYYMMDD_hhmmss.
    "eynsham": (30, True, (607_000.0, 5_740_000.0),
                lambda lat, lon, i: dst_name(lat, lon, f"{42 + i:04d}", tile_num=i % 5, timestamp="20080416_121314"),
                lambda lat, lon, i: dst_name(lat, lon, f"{4800 + i:04d}", tile_num=i % 5,
                                             timestamp="20080416_133005")),
}
MAP_BUILDING = {"pitts30k", "pitts250k", "tokyo247", "san-francisco", "st-lucia", "eynsham"}


def write_benchmark(name: str, tmp_path: Path) -> Written:
    """Write benchmark `name` below tmp_path as its tool lays it out (module docstring)."""
    if name in UTM_SETS:
        zone, northern, origin, db_name, q_name = UTM_SETS[name]
        root = tmp_path / "datasets" / name.replace("-", "_")
        street(root / "images/test/database", zone, northern, origin, DB_OFFSETS_M, 0, db_name)
        street(root / "images/test/queries", zone, northern, origin, Q_OFFSETS_M, 100, q_name)
        if name.startswith("pitts"):  # format_pitts30k.py:43-53 writes train and val beside test
            for split in ("train", "val"):
                street(root / "images" / split / "database", zone, northern, origin, (7.0,), 300, db_name)
        if name in MAP_BUILDING:  # map_builder.py:165: map_<name>.png in the dataset folder
            (root / f"map_{root.name}.png").write_bytes(jpeg_bytes(400))
        return Written(root, len(DB_OFFSETS_M), STREET_POSITIVES)
    if name == "msls-val":
        return _msls(tmp_path)
    if name == "nordland":
        root = tmp_path / "datasets" / "nordland"
        frames = range(14)
        write_images(root / "images/test/database", [nordland_name(f) for f in frames], 0)
        write_images(root / "images/test/queries", [nordland_name(f) for f in frames], 100)
        write_images(root / "raw_data" / "summer", ["00001.png"], 200)  # the script leaves raw_data
        # Names sort by northing, zero-padded: path order is frame order.
        return Written(root, len(frames), [[d for d in frames if abs(d - q) <= 10] for q in frames])
    if name in ("amstertime", "sped"):
        root = tmp_path / "datasets" / name
        # AmsterTime's pair names are numbers (the script takes int() of them; 4 digits here);
        # SPEDTEST's ref/ and query/ hold 0000000.jpg .. 0000606.jpg (TeTRA-VPR's SPED_dbImages.npy).
        stems = [f"{i:04d}" for i in range(13)] if name == "amstertime" else [f"{i:07d}" for i in range(12)]
        names = sorted(pair_name(s) for s in stems)  # @0@0@, @0@1000@, @0@10000@, ...: not numeric order
        write_images(root / "images/test/database", names, 0)
        write_images(root / "images/test/queries", names, 100)
        return Written(root, len(names), [[i] for i in range(len(names))])  # each query's twin, and nothing else
    if name.startswith("svox"):  # the archive of download_svox.py: one gallery, six query folders (Oxford, 30U)
        root = tmp_path / "datasets" / "svox"
        origin = (620_000.0, 5_735_000.0)
        def name_of(lat, lon, i):
            return dst_name(lat, lon, "")
        street(root / "images/test/gallery", 30, True, origin, DB_OFFSETS_M, 0, name_of)
        for i, folder in enumerate(SVOX_QUERIES):
            street(root / "images/test" / folder, 30, True, origin, Q_OFFSETS_M[: 1 + i % 3], 100 + 10 * i, name_of)
        count = 1 + SVOX_QUERIES.index(_queries_folder(name)) % 3
        return Written(root, len(DB_OFFSETS_M), STREET_POSITIVES[:count])
    if name.startswith("sf-xl"):
        return _sf_xl(name, tmp_path)
    raise AssertionError(f"no fixture for benchmark {name}")


def _queries_folder(name: str) -> str:
    return BENCHMARKS[name].queries.rsplit("/", 1)[-1]


def _msls(tmp_path: Path) -> Written:
    """format_mapillary.py:36-54: msls/<train|val>/<database|queries> below the folder it runs in,
    val holding cph and sf (two zones: 33U, 10S), and msls/test a link to msls/val."""
    root = tmp_path / "msls"
    cities = (("cph", 33, (347_000.0, 6_172_000.0), 0), ("sf", 10, (551_000.0, 4_180_000.0), 50))
    for city, zone, origin, seed in cities:
        for side, offsets, view in (("database", DB_OFFSETS_M, "Backward"), ("queries", Q_OFFSETS_M[:2], "Forward")):
            def name_of(lat, lon, i, city=city, side=side, view=view):
                return msls_name(lat, lon, f"{city}{side[0]}{i}Zbi5dj3vR2mlw1RKCG"[:22], "2016-09-15", False, view,
                                 city)
            street(root / "val" / side, zone, True, origin, offsets, seed + (20 if side == "queries" else 0), name_of)
    street(root / "train" / "database", 32, True, (466_000.0, 5_428_000.0), (0.0,), 90,
           lambda lat, lon, i: msls_name(lat, lon, "zurichkey0000000000000", "2017-06-01", True, "Sideways", "zurich"))
    os.symlink(os.path.abspath(root / "val"), root / "test")
    # Sorted names: cph's eastings (0347...) come before sf's (0551...).
    return Written(root, 2 * len(DB_OFFSETS_M), [[0, 1], [2, 3], [5, 6], [7, 8]])


def _sf_xl(name: str, tmp_path: Path) -> Written:
    """sf_xl/processed/test: one database, four query folders (SF-XL's README), all in 10S."""
    root = tmp_path / "sf_xl" / "processed"
    origin = (549_000.0, 4_181_000.0)
    names = street(root / "test/database", 10, True, origin, DB_OFFSETS_M, 0,
                   lambda lat, lon, i: sf_xl_name(lat, lon, f"91v00dfETJ4DjDI7udN8x{i}", 30 * i, "201904"))
    (root / "test" / "database_images_paths.txt").write_text("\n".join(names) + "\n")  # README: "Other files"
    for i, folder in enumerate(SF_XL_QUERIES):
        def name_of(lat, lon, j, night=folder == "queries_night"):
            if not night:
                return sf_xl_name(lat, lon, f"{51321055860 + j}", None, "20210718")
            # Lat/lon put the query at 5 m 15 m from database image 0 and 34 m from image 1, its
            # UTM fields 5 and 15 m: only fields 1 and 2 give its positives [0, 1].
            utm = latlon_to_utm(np.array([lat]), np.array([lon]))
            east, north = float(utm.east_m[0]), float(utm.north_m[0])
            shifted = latlon_at(east + SF_XL_NIGHT_LATLON_OFFSET_M[0], north + SF_XL_NIGHT_LATLON_OFFSET_M[1], 10,
                                True)
            return sf_xl_name(*shifted, f"{31760538811 + j}", None, "20161226", plain_latlon=True,
                              east_north=(east, north))
        street(root / "test" / folder, 10, True, origin, Q_OFFSETS_M[: 1 + i % 3], 100 + 10 * i, name_of)
    count = 1 + SF_XL_QUERIES.index(_queries_folder(name)) % 3
    return Written(root, len(DB_OFFSETS_M), STREET_POSITIVES[:count])
