import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backend import geometry
from helpers import iou, rasterize

H, W = 150, 200
yy, xx = np.mgrid[:H, :W]
SHAPES = {
    "rectangle": (xx >= 30) & (xx < 90) & (yy >= 20) & (yy < 60),
    "disk": (xx - 100) ** 2 + (yy - 75) ** 2 < 40**2,
    "ellipse": ((xx - 90) / 70.0) ** 2 + ((yy - 70) / 30.0) ** 2 < 1,
    "triangle": (yy > 10) & (yy < 140) & (np.abs(xx - 100) < (yy - 10) * 0.6),
    "one pixel": (xx == 5) & (yy == 5),
}


def polygons_mask(polys):
    out = np.zeros((H, W), bool)
    for p in polys:
        out |= rasterize(geometry.polygon_to_percent(p, W, H), W, H)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
def test_exact_outline_rasterises_back_to_the_mask(name):
    polys = geometry.mask_to_polygons(SHAPES[name], tolerance=0, min_area=0)
    assert len(polys) == 1
    assert iou(polygons_mask(polys), SHAPES[name]) == 1.0


@pytest.mark.parametrize("name", ["rectangle", "disk", "ellipse", "triangle"])
def test_simplified_outline_keeps_iou_098(name):
    polys = geometry.mask_to_polygons(SHAPES[name], tolerance=1.0)
    exact = geometry.mask_to_polygons(SHAPES[name], tolerance=0)
    assert len(polys[0]) <= len(exact[0])
    assert iou(polygons_mask(polys), SHAPES[name]) >= 0.98


def test_larger_tolerance_gives_fewer_points():
    fine = geometry.mask_to_polygons(SHAPES["disk"], tolerance=0.5)[0]
    coarse = geometry.mask_to_polygons(SHAPES["disk"], tolerance=3.0)[0]
    assert len(coarse) < len(fine)


def test_rectangle_corners_round_trip_within_half_a_pixel():
    poly = geometry.mask_to_polygons(SHAPES["rectangle"], tolerance=1.0)[0]
    pct = np.array(geometry.polygon_to_percent(poly, W, H))
    px = pct * [W / 100.0, H / 100.0]
    corners = {(30, 20), (90, 20), (90, 60), (30, 60)}  # pixel edges of columns 30..89, rows 20..59
    assert len(px) == 4
    for x, y in px:
        assert min(abs(x - cx) + abs(y - cy) for cx, cy in corners) <= 0.5


def test_multi_part_mask_gives_one_polygon_per_piece_and_drops_specks():
    mask = (SHAPES["rectangle"] | ((xx - 150) ** 2 + (yy - 110) ** 2 < 15**2)).copy()
    mask[140, 5] = True  # a one-pixel speck
    polys = geometry.mask_to_polygons(mask, tolerance=1.0, min_area=16)
    assert len(polys) == 2
    xs = sorted(p[:, 0].mean() for p in polys)
    assert xs[0] < 100 < xs[1]
    assert iou(polygons_mask(polys), mask) >= 0.98


def test_holes_are_filled_because_a_label_studio_polygon_has_none():
    ring = SHAPES["disk"] & ~((xx - 100) ** 2 + (yy - 75) ** 2 < 15**2)
    polys = geometry.mask_to_polygons(ring, tolerance=0)
    assert len(polys) == 1
    assert iou(polygons_mask(polys), SHAPES["disk"]) == 1.0


def test_empty_mask_gives_no_polygon():
    assert geometry.mask_to_polygons(np.zeros((H, W), bool)) == []


def test_brush_rle_decodes_to_the_mask_with_the_sdk():
    mask = SHAPES["ellipse"]
    rle = geometry.mask_to_rle(mask)
    decoded = np.reshape(decode_rle(rle), (H, W, 4))[:, :, 3] > 0
    assert (decoded == mask).all()


def test_box_is_tight_around_the_mask():
    assert geometry.mask_to_box(SHAPES["rectangle"]) == (30, 20, 90, 60)
    assert geometry.mask_to_box(np.zeros((4, 4), bool)) is None
