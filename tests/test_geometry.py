import numpy as np
import pytest
from helpers import iou, rasterize
from label_studio_sdk.converter.brush import decode_rle

from backend.annotate import geometry

H, W = 150, 200
yy, xx = np.mgrid[:H, :W]
SHAPES = {
    "rectangle": (xx >= 30) & (xx < 90) & (yy >= 20) & (yy < 60),
    "disk": (xx - 100) ** 2 + (yy - 75) ** 2 < 40**2,
    "ellipse": ((xx - 90) / 70.0) ** 2 + ((yy - 70) / 30.0) ** 2 < 1,
    "triangle": (yy > 10) & (yy < 140) & (np.abs(xx - 100) < (yy - 10) * 0.6),
    "one pixel": (xx == 5) & (yy == 5),
}


def polygons_mask(polys, rule="evenodd", w=W, h=H):
    out = np.zeros((h, w), bool)
    for p in polys:
        out |= rasterize(geometry.polygon_to_percent(p, w, h), w, h, rule)
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


def test_multi_part_mask_gives_one_polygon_per_piece_and_drops_only_specks():
    mask = (SHAPES["rectangle"] | ((xx - 150) ** 2 + (yy - 110) ** 2 < 15**2)).copy()
    mask[140, 5] = True  # a one-pixel speck
    mask[5:10, 180:185] = True  # 25 pixels: under 1 % of the rectangle, yet no speck: kept
    polys = geometry.mask_to_polygons(mask, tolerance=1.0, min_area=16)
    assert len(polys) == 3
    assert iou(polygons_mask(polys), mask & ~((xx == 5) & (yy == 140))) >= 0.98


def shapes_of_the_issue():
    """Disk, donut, plate with holes, two pieces, 3 px line, text, random blobs, island in a hole."""
    import cv2

    h, w = 200, 240
    y, x = np.mgrid[:h, :w]
    r2 = (x - 120) ** 2 + (y - 100) ** 2
    plate = r2 < 90**2
    for cx, cy in [(90, 80), (150, 80), (120, 135)]:
        plate &= (x - cx) ** 2 + (y - cy) ** 2 >= 15**2
    line = np.zeros((h, w), bool)
    line[100:103, 20:220] = True
    text = np.zeros((h, w), np.uint8)
    cv2.putText(text, "SAM 3", (20, 130), cv2.FONT_HERSHEY_SIMPLEX, 2.5, 1, 6)
    noise = cv2.GaussianBlur(np.random.RandomState(0).rand(h, w).astype(np.float32), (0, 0), 6)
    return w, h, {
        "disk": r2 < 60**2,
        "donut": (r2 < 70**2) & (r2 >= 35**2),
        "plate with holes": plate,
        "two pieces": ((x - 60) ** 2 + (y - 60) ** 2 < 30**2) | ((x - 180) ** 2 + (y - 140) ** 2 < 40**2),
        "3 px line": line,
        "text": text > 0,
        "random blobs": noise > np.percentile(noise, 60),
        "island in a hole": ((r2 < 90**2) & (r2 >= 50**2)) | (r2 < 20**2),
    }


@pytest.mark.parametrize("rule", ["evenodd", "nonzero"])
def test_the_issues_shapes_come_back_with_their_holes_under_both_fill_rules(rule):
    w, h, shapes = shapes_of_the_issue()
    for name, mask in shapes.items():
        polys = geometry.mask_to_polygons(mask)  # the default tolerance
        assert iou(polygons_mask(polys, rule, w, h), mask) >= 0.98, name
    donut = geometry.mask_to_polygons(shapes["donut"])
    assert len(donut) == 1  # one Label Studio polygon: the hole is keyholed in
    assert not polygons_mask(donut, rule, w, h)[100, 120]  # the middle stays empty


def test_holes_can_be_turned_off_for_plain_outlines():
    ring = SHAPES["disk"] & ~((xx - 100) ** 2 + (yy - 75) ** 2 < 15**2)
    polys = geometry.mask_to_polygons(ring, tolerance=0, holes=False)
    assert len(polys) == 1
    assert iou(polygons_mask(polys), SHAPES["disk"]) == 1.0
    with_holes = geometry.mask_to_polygons(ring, tolerance=0)
    assert iou(polygons_mask(with_holes), ring) == 1.0 and iou(polygons_mask(with_holes, "nonzero"), ring) == 1.0


def test_a_mask_in_thousands_of_fragments_stays_small():
    import cv2

    noise = cv2.resize(np.random.RandomState(1).randn(96, 128).astype(np.float32), (1280, 960))
    mask = noise > 0  # what untrained weights (or foliage) give: thousands of pieces with holes
    polys = geometry.mask_to_polygons(mask, max_pieces=8, max_points=300)
    assert len(polys) == 8  # the largest pieces (its time: bench/click_latency.py)
    assert all(len(p) <= 300 + 8 * 3 for p in polys)  # the cap, plus three points per cut


@pytest.mark.parametrize("start,end", [((0, 0), (639, 479)), ((639, 0), (0, 479)), ((0, 400), (639, 380)),
                                       ((10, 0), (40, 479))])
def test_thin_lines_at_any_angle_keep_their_shape_under_the_point_cap(start, end):
    """A 3 px line (a cable, a crack, a road marking) has a staircase outline of thousands of corners: over
    the cap, it is simplified only as far as the cap needs, not into a thin quadrilateral."""
    import cv2

    h, w = 480, 640
    mask = np.zeros((h, w), np.uint8)
    cv2.line(mask, start, end, 1, 3)
    mask = mask.astype(bool)
    exact = geometry.mask_to_polygons(mask, tolerance=0, max_points=10**6)
    polys = geometry.mask_to_polygons(mask, max_points=1000)
    assert sum(len(p) for p in polys) <= 1000
    assert iou(polygons_mask(polys, w=w, h=h), mask) >= 0.98
    if len(exact[0]) > 1000:  # the cap applied: it kept as many points as it could, not a handful
        assert len(polys[0]) >= 300, len(polys[0])


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
