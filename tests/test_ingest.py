"""The ingest end of perception: decoding, 1-fps sampling, clip assembly (uniform and scene), preprocessing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dispider_vllm.perception.clips import ClipAssembler
from dispider_vllm.perception.frames import (
    CLIP_MEAN,
    CLIP_STD,
    FrameError,
    FrameSampler,
    PreprocessorConfig,
    VideoError,
    check_image_header,
    decode_frames,
    decode_image,
    decode_video,
    load_preprocessor_config,
    preprocess_frames,
    preprocess_on_device,
    preprocess_with_config,
    probe_video,
    validate_frame,
    with_pixels,
)
from dispider_vllm.perception.scenes import SceneOptions, resample_scene
from dispider_vllm.types import EncodedFrame, Frame
from dispider_vllm.video.synth import main as synth_main
from dispider_vllm.video.synth import make_test_frames, make_test_video


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return make_test_video(tmp_path_factory.mktemp("video") / "synth.mp4", seconds=48, fps=4, scenes=3)


@pytest.fixture(scope="module")
def decoded(video_path):
    return list(decode_video(video_path))


def flat_frame(timestamp: float, colour=(0, 0, 0), size=(32, 32)) -> Frame:
    return Frame(timestamp, np.full((size[1], size[0], 3), colour, dtype=np.uint8))


def sample(frames, fps=1.0):
    sampler = FrameSampler(fps)
    return [picked for frame in frames for picked in sampler.push(frame)]


def assemble(frames, **options):
    assembler = ClipAssembler(**options)
    clips = [clip for frame in frames for clip in assembler.push(frame)]
    return clips + assembler.flush()


# ------------------------------------------------------------------------------------------------ decoding


def test_decode_gives_every_frame_with_monotonic_times(video_path, decoded):
    assert len(decoded) == 48 * 4
    times = [frame.timestamp for frame in decoded]
    assert times[0] == 0.0 and times[-1] == pytest.approx(47.75)
    assert all(later > earlier for earlier, later in zip(times, times[1:]))
    assert decoded[0].pixels.shape == (240, 320, 3) and decoded[0].pixels.dtype == np.uint8

    info = probe_video(video_path)
    assert (info.width, info.height, info.fps) == (320, 240, 4.0)
    assert info.duration == pytest.approx(48.0)
    assert info.codec in ("h264", "mpeg4")


def test_decode_from_bytes_and_file_objects(video_path, decoded):
    data = video_path.read_bytes()
    assert len(list(decode_video(data))) == len(decoded)
    from_file = list(decode_video(io.BytesIO(data)))
    assert [f.timestamp for f in from_file] == [f.timestamp for f in decoded]
    with pytest.raises(VideoError, match="over the limit"):
        decode_video(data, max_bytes=len(data) - 1)


def test_unreadable_videos_raise_video_error(tmp_path):
    with pytest.raises(VideoError, match="not a readable video"):
        decode_video(b"this is not a video at all" * 50)
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    with pytest.raises(VideoError):  # a still image is not an accepted container
        decode_video(png.getvalue())
    with pytest.raises(VideoError, match="no such video file"):
        decode_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="empty"):
        probe_video(b"")


# ------------------------------------------------------------------------------------------------ sampling


def test_sampler_keeps_the_frame_nearest_each_target(decoded):
    picked = sample(decoded)
    assert [f.timestamp for f in picked] == [k + 0.5 for k in range(48)]
    assert picked[3].pixels is decoded[14].pixels

    jittered = [flat_frame(t) for t in (0.0, 0.45, 0.9, 1.35, 1.8, 2.25, 2.7)]
    # targets 0.5, 1.5, 2.5 -> 0.45 (nearest), 1.35 (0.15 away vs 0.3), 2.7 (0.2 away vs 0.25)
    assert [f.timestamp for f in sample(jittered)] == [0.45, 1.35, 2.7]


def test_sampler_decides_each_target_on_the_first_frame_past_it():
    sampler = FrameSampler(1.0)
    assert sampler.push(flat_frame(0.0)) == []
    assert sampler.push(flat_frame(0.4)) == []
    assert [f.timestamp for f in sampler.push(flat_frame(0.55))] == [0.55]
    # a gap: targets 1.5, 2.5, 3.5 are decided at once, each by the nearer of the frames either side of it
    assert [f.timestamp for f in sampler.push(flat_frame(3.5))] == [0.55, 3.5, 3.5]


def test_sampler_breaks_ties_towards_the_earlier_frame():
    assert [f.timestamp for f in sample([flat_frame(0.0), flat_frame(1.0)])] == [0.0]


def test_backwards_timestamp_is_rejected_without_harm():
    sampler = FrameSampler(1.0)
    sampler.push(flat_frame(0.0))
    sampler.push(flat_frame(0.6))
    with pytest.raises(FrameError, match="goes back"):
        sampler.push(flat_frame(0.2))
    with pytest.raises(FrameError, match="shape"):
        sampler.push(Frame(1.6, np.zeros((32, 32, 4), dtype=np.uint8)))
    assert [f.timestamp for f in sampler.push(flat_frame(1.6))] == [1.6]  # 1.5: 1.6 beats 0.6


# ------------------------------------------------------------------------------------------ uniform clips


def test_48_seconds_at_1_fps_give_three_full_uniform_clips(decoded):
    clips = assemble(sample(decoded))
    assert [(c.index, c.start, c.end) for c in clips] == [(0, 0.0, 16.0), (1, 16.0, 32.0), (2, 32.0, 48.0)]
    for clip in clips:
        assert clip.pixels.shape == (16, 3, 224, 224) and clip.pixels.dtype == torch.float32
        assert clip.frame_times == tuple(clip.start + k + 0.5 for k in range(16))


def test_flush_closes_a_partial_clip_by_repeating_its_last_frame():
    frames = make_test_frames(seconds=40, fps=2, size=(64, 48))
    assembler = ClipAssembler()
    clips = [clip for frame in sample(frames) for clip in assembler.push(frame)]
    assert [(c.start, c.end) for c in clips] == [(0.0, 16.0), (16.0, 32.0)]
    (last,) = assembler.flush()
    assert (last.index, last.start, last.end) == (2, 32.0, 40.0)  # end = last sample time 39.5, rounded
    assert last.frame_times == tuple(32.5 + k for k in range(8)) + (39.5,) * 8
    assert torch.equal(last.pixels[7], last.pixels[15])
    assert assembler.flush() == []


def test_a_rejected_frame_leaves_the_assembler_usable():
    assembler = ClipAssembler(frames_per_clip=2)
    assert assembler.push(flat_frame(0.5)) == []
    with pytest.raises(FrameError):
        assembler.push(Frame(1.5, np.zeros((32, 32), dtype=np.uint8)))  # no channels
    with pytest.raises(FrameError):
        assembler.push(Frame(1.5, np.zeros((32, 32, 3), dtype=np.float32)))
    with pytest.raises(FrameError, match="goes back"):
        assembler.push(flat_frame(0.1))
    (clip,) = assembler.push(flat_frame(1.5))
    assert (clip.index, clip.start, clip.end, clip.frame_times) == (0, 0.0, 2.0, (0.5, 1.5))


# -------------------------------------------------------------------------------------------- scene clips


def test_scene_mode_finds_the_synthetic_scene_changes(decoded):
    clips = assemble(sample(decoded), mode="scene")
    assert [(c.index, c.start, c.end) for c in clips] == [(0, 0.0, 16.0), (1, 16.0, 32.0), (2, 32.0, 48.0)]
    assert all(c.pixels.shape == (16, 3, 224, 224) for c in clips)


def test_scene_exclusion_window_and_maximum_length():
    red, blue = (200, 40, 40), (40, 60, 200)
    flash = [flat_frame(k + 0.5, blue if k == 20 else red) for k in range(41)]
    clips = assemble(flash, mode="scene", scene_options=SceneOptions(min_frames=8))
    assert [(c.start, c.end) for c in clips] == [(0.0, 20.0), (20.0, 41.0)]  # no one-frame clip for the flash

    static = [flat_frame(k + 0.5, red) for k in range(150)]
    clips = assemble(static, mode="scene", scene_options=SceneOptions(max_frames=64))
    assert [(c.start, c.end) for c in clips] == [(0.0, 64.0), (64.0, 128.0), (128.0, 150.0)]


def test_scene_resampling_spreads_16_frames_over_the_scene():
    frames = [flat_frame(float(k)) for k in range(64)]
    assert [f.timestamp for f in resample_scene(frames)] == [4.0 * k for k in range(16)]
    short = [flat_frame(float(k)) for k in range(4)]
    assert [f.timestamp for f in resample_scene(short)] == [float(k // 4) for k in range(16)]


def test_scene_mode_takes_a_custom_embedding():
    frames = [flat_frame(k + 0.5, (k // 10 * 50, 0, 0)) for k in range(30)]
    by_time = SceneOptions(embed=lambda pixels: np.array([1.0, pixels[0, 0, 0] / 255.0]), threshold=0.999)
    clips = assemble(frames, mode="scene", scene_options=by_time)
    assert [(c.start, c.end) for c in clips] == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]


# ------------------------------------------------------------------------------------------- preprocessing


def test_constant_colour_normalises_to_the_clip_formula():
    colour = (10, 128, 250)
    out = preprocess_frames([np.full((240, 320, 3), colour, dtype=np.uint8)] * 2)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_a_non_square_frame_is_squashed_not_cropped():
    frame = np.zeros((240, 320, 3), dtype=np.uint8)
    frame[:, :30] = (255, 0, 0)  # a 30-px red left edge: a 240-px center crop would cut all of it away
    out = preprocess_frames([frame])
    full_red, no_red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[0] / CLIP_STD[0]
    # the edge is squashed to 30 * 240 / 320 * 224 / 240 = 21 px; away from it the red channel is exact
    assert torch.allclose(out[0, 0, :, :16], torch.full((224, 16), full_red), atol=1e-5)
    assert torch.allclose(out[0, 0, :, 26:], torch.full((224, 198), no_red), atol=1e-5)


def test_preprocessor_config_sets_mean_std_and_size(tmp_path):
    config = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 112},
              "crop_size": {"height": 112, "width": 112}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = load_preprocessor_config(tmp_path)
    assert (loaded.shortest_edge, loaded.crop_height, loaded.image_mean) == (112, 112, (0.5, 0.5, 0.5))
    clips = assemble([flat_frame(0.5, (255, 255, 255))], frames_per_clip=1, preprocessor=config)
    assert clips[0].pixels.shape == (1, 3, 112, 112)
    assert torch.allclose(clips[0].pixels, torch.ones(1, 3, 112, 112))


@pytest.mark.parametrize("size", [(240, 320), (480, 640), (100, 37), (223, 224), (224, 224), (224, 500)])
def test_preprocessing_on_the_device_matches_the_hosts_to_two_levels(size):
    """The GPU sidecar's path (here on the CPU's kernels): PIL's squash exactly, the uint8 bicubic resize within
    two levels of 255 on under 1% of a random-noise frame's values; no resize, no difference."""
    frames = np.random.default_rng(sum(size)).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    config = PreprocessorConfig.from_dict({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]})
    host = preprocess_with_config(list(frames), config)
    device = preprocess_on_device(torch.from_numpy(frames), config)
    assert device.shape == host.shape == (2, 3, 224, 224) and device.dtype == torch.float32
    levels = ((device - host) * torch.tensor(config.image_std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 2.0 + 1e-3
    assert (levels > 0.01).float().mean() < 0.01
    if min(size) == 224:
        assert levels.max() < 1e-3
    with pytest.raises(ValueError, match="uint8 frames"):
        preprocess_on_device(torch.from_numpy(frames).float(), config)


# -------------------------------------------------------------------------------------------- live images


def test_pushed_images_decode_and_bad_ones_raise_frame_error():
    pixels = make_test_frames(seconds=1, fps=1, size=(64, 48))[0].pixels
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    assert np.array_equal(decode_image(png.getvalue()), pixels)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    assert decode_image(jpeg.getvalue()).shape == (48, 64, 3)

    with pytest.raises(FrameError, match="not a readable"):
        decode_image(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(FrameError, match="not a readable"):
        decode_image(png.getvalue()[: len(png.getvalue()) // 2])
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    with pytest.raises(FrameError, match="8x8"):
        decode_image(tiny.getvalue())
    with pytest.raises(FrameError):
        validate_frame(np.zeros((32, 32, 4), dtype=np.uint8))


def test_image_headers_are_checked_without_decoding():
    """What the server checks of a pushed image before the sidecar decodes it: the format and the size."""
    pixels = make_test_frames(seconds=1, fps=1, size=(64, 48))[0].pixels
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    assert check_image_header(jpeg.getvalue()) == (64, 48)
    scan = jpeg.getvalue().index(b"\xff\xda")  # the start of the compressed data: the header is all before it
    assert check_image_header(jpeg.getvalue()[: scan + 20]) == (64, 48)  # a broken body is found only when decoded
    tiny, gif = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    for data, match in ((tiny.getvalue(), "8x8"), (gif.getvalue(), "not a readable"),
                        (b"\xff\xd8 x", "not a readable")):
        with pytest.raises(FrameError, match=match):
            check_image_header(data)


def test_encoded_frames_decode_together_and_a_broken_one_stays_encoded():
    """The sidecar's batch decoding: JPEGs in one call (the same pixels as Pillow's), PNG through Pillow, frames
    already decoded untouched; a JPEG broken past its header comes back encoded, and fails in its place."""
    frames = make_test_frames(seconds=3, fps=1, size=(64, 48), seed=2)
    jpegs = []
    for frame in frames:
        out = io.BytesIO()
        Image.fromarray(frame.pixels).save(out, format="JPEG", quality=85)
        jpegs.append(out.getvalue())
    png = io.BytesIO()
    Image.fromarray(frames[1].pixels).save(png, format="PNG")
    broken = EncodedFrame(1.0, jpegs[1][: jpegs[1].index(b"\xff\xda") + 20])  # a good header, a broken body
    given = [EncodedFrame(0.0, jpegs[0]), broken, EncodedFrame(2.0, png.getvalue()), frames[2],
             EncodedFrame(4.0, jpegs[2])]
    got = decode_frames(given)
    assert [frame.timestamp for frame in got] == [0.0, 1.0, 2.0, frames[2].timestamp, 4.0]
    assert got[1] is broken and got[3] is frames[2]
    np.testing.assert_array_equal(got[0].pixels, decode_image(jpegs[0]))
    np.testing.assert_array_equal(got[4].pixels, decode_image(jpegs[2]))
    np.testing.assert_array_equal(got[2].pixels, frames[1].pixels)
    with pytest.raises(FrameError, match="not a readable"):
        with_pixels(broken)
    assert decode_frames([]) == []


def test_synth_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth_main(["--help"])
    assert exit_info.value.code == 0
    assert "--seconds" in capsys.readouterr().out
