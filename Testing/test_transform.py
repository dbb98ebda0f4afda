"""The model-input transform: slice rc <-> model xy are exact inverses; boxes enclose their pixels."""
from __future__ import annotations

import numpy as np
import pytest

from SPDSegmentLib.core.models.transform import SliceTransform


@pytest.mark.parametrize("height, width, size", [(64, 64, 64), (37, 50, 256), (50, 37, 256), (256, 256, 256),
                                                 (512, 512, 1024), (300, 200, 1024), (1, 7, 1024)])
def test_slice_transform_inverses(height, width, size):
    tf = SliceTransform(height, width, size)
    rng = np.random.default_rng(height * width)
    rc = rng.uniform(-0.5, [height - 0.5, width - 0.5], size=(50, 2))
    xy = tf.rc_to_model_xy(rc)
    np.testing.assert_allclose(tf.model_xy_to_rc(xy), rc, atol=1e-9)
    np.testing.assert_allclose(tf.rc_to_model_xy(tf.model_xy_to_rc(xy)), xy, atol=1e-9)
    # the slice fills the model input along its longest side, top-left aligned
    rh, rw = tf.resized_hw
    assert max(rh, rw) == size and rh <= size and rw <= size
    corners = tf.rc_to_model_xy([[-0.5, -0.5], [height - 0.5, width - 0.5]])
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [width * tf.scale - 0.5, height * tf.scale - 0.5]], atol=1e-9)


def test_slice_transform_conventions():
    same = SliceTransform(64, 64, 64)
    np.testing.assert_allclose(same.rc_to_model_xy([[3, 5]]), [[5, 3]])  # rc -> xy swaps the axes
    double = SliceTransform(128, 64, 256)
    np.testing.assert_allclose(double.rc_to_model_xy([[0, 0], [10, 4]]), [[0.5, 0.5], [8.5, 20.5]])


def test_box_rc_to_model():
    same = SliceTransform(64, 64, 64)
    np.testing.assert_allclose(same.box_rc_to_model([2, 3], [5, 8]), [3, 2, 8, 5])
    double = SliceTransform(128, 128, 256)
    np.testing.assert_allclose(double.box_rc_to_model([0, 0], [127, 127]), [0, 0, 255, 255])
    tf = SliceTransform(37, 50, 256)
    box = tf.box_rc_to_model([4, 6], [20, 30])
    inner = tf.rc_to_model_xy([[4, 6], [20, 30], [12, 18]])
    assert box[0] < box[2] and box[1] < box[3]
    assert np.all(inner >= box[:2] - 1e-9) and np.all(inner <= box[2:] + 1e-9)
