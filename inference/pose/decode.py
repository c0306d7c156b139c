"""People from OpenPose's maps (the part-affinity-field method of Cao et al., "Realtime
Multi-Person 2D Pose Estimation using Part Affinity Fields", with the thresholds of CMU's and
lllyasviel's implementations):

1. **Peaks**: each keypoint's heatmap, smoothed by a Gaussian (σ 3 px), has a candidate wherever
   it is at least each of its four neighbours and above 0.1.
2. **Limbs**: for each limb, every pair of candidates of its two keypoints is scored by the line
   integral of the limb's PAF along the segment between them (10 samples of the field's
   component along the segment). A pair is kept when 80 % of the samples pass 0.05 and the mean,
   less a penalty for segments longer than half the picture's height, is positive; the pairs are
   then taken best first, each candidate in one limb at most.
3. **People**: limbs sharing a keypoint candidate join into one person (two partial people
   sharing none merge when a limb links them); a person with under 4 keypoints, or a mean score
   under 0.4, is dropped.

The maps are (height, width, channels) arrays at the picture's size; the poses come back with
coordinates as fractions of that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from inference.pose.skeleton import KEYPOINTS, LIMB_PAFS, LIMBS, Pose

PEAK_SIGMA = 3.0
PEAK_THRESHOLD = 0.1
# A worker's guard: random or broken weights could light up a whole map; the strongest peaks of a
# part are kept (a real picture has far fewer people than this).
MAX_PEAKS_PER_KEYPOINT = 64
LINE_SAMPLES = 10
LINE_THRESHOLD = 0.05
LINE_PASSING_SHARE = 0.8
MIN_KEYPOINTS = 4
MIN_MEAN_SCORE = 0.4
# Limbs before this index may start a new person; the ear-shoulder ones only extend one.
STARTING_LIMBS = 17


@dataclass(frozen=True)
class Peak:
    """A keypoint candidate: where it is (pixels), its heatmap score and its id among all."""

    x: int
    y: int
    score: float
    id: int


@dataclass(frozen=True)
class Link:
    """A limb between two candidates (ids) and the score of its PAF line integral."""

    a: int
    b: int
    score: float


@dataclass
class _Person:
    parts: list[int] = field(default_factory=lambda: [-1] * len(KEYPOINTS))
    score: float = 0.0

    @property
    def count(self) -> int:
        return sum(p >= 0 for p in self.parts)


def find_peaks(heatmaps: np.ndarray) -> list[list[Peak]]:
    """The candidates of each of the 18 keypoints (the background map is not read)."""
    peaks: list[list[Peak]] = []
    next_id = 0
    for part in range(len(KEYPOINTS)):
        raw = np.ascontiguousarray(heatmaps[..., part], dtype=np.float32)
        smooth = cv2.GaussianBlur(raw, (0, 0), PEAK_SIGMA)
        padded = np.pad(smooth, 1)
        centre = padded[1:-1, 1:-1]
        is_peak = (
            (centre >= padded[1:-1, :-2])
            & (centre >= padded[1:-1, 2:])
            & (centre >= padded[:-2, 1:-1])
            & (centre >= padded[2:, 1:-1])
            & (centre > PEAK_THRESHOLD)
        )
        ys, xs = np.nonzero(is_peak)
        if len(xs) > MAX_PEAKS_PER_KEYPOINT:
            strongest = np.argsort(-smooth[ys, xs], kind="stable")[:MAX_PEAKS_PER_KEYPOINT]
            ys, xs = ys[strongest], xs[strongest]
        found = []
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            found.append(Peak(x, y, float(raw[y, x]), next_id))
            next_id += 1
        peaks.append(found)
    return peaks


def link_limb(starts: list[Peak], ends: list[Peak], paf_x: np.ndarray, paf_y: np.ndarray) -> list[Link]:
    """The limbs between ``starts`` and ``ends`` that the PAF supports, best first, each peak
    used once."""
    height, width = paf_x.shape
    scored: list[tuple[float, int, int]] = []
    for i, a in enumerate(starts):
        for j, b in enumerate(ends):
            dx, dy = b.x - a.x, b.y - a.y
            norm = max(float(np.hypot(dx, dy)), 1e-3)
            xs = np.rint(np.linspace(a.x, b.x, LINE_SAMPLES)).astype(int).clip(0, width - 1)
            ys = np.rint(np.linspace(a.y, b.y, LINE_SAMPLES)).astype(int).clip(0, height - 1)
            along = (paf_x[ys, xs] * dx + paf_y[ys, xs] * dy) / norm
            # Segments longer than half the picture's height are unlikely limbs.
            score = float(along.mean()) + min(0.5 * height / norm - 1.0, 0.0)
            passing = int((along > LINE_THRESHOLD).sum())
            if passing > LINE_PASSING_SHARE * LINE_SAMPLES and score > 0:
                scored.append((score, i, j))
    scored.sort(key=lambda s: -s[0])
    links: list[Link] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for score, i, j in scored:
        if i in used_a or j in used_b:
            continue
        links.append(Link(starts[i].id, ends[j].id, score))
        used_a.add(i)
        used_b.add(j)
        if len(links) >= min(len(starts), len(ends)):
            break
    return links


def assemble_people(peaks: list[list[Peak]], links: list[list[Link]]) -> list[_Person]:
    """People from the limbs (``links[k]`` those of ``LIMBS[k]``), weak ones dropped."""
    score_of = {p.id: p.score for part in peaks for p in part}
    people: list[_Person] = []
    for limb, (part_a, part_b) in enumerate(LIMBS):
        for link in links[limb]:
            holders = [p for p in people if p.parts[part_a] == link.a or p.parts[part_b] == link.b]
            if len(holders) == 2:
                first, second = holders
                if not any(a >= 0 and b >= 0 for a, b in zip(first.parts, second.parts, strict=True)):
                    # Two parts of one person, joined by this limb.
                    first.parts = [max(a, b) for a, b in zip(first.parts, second.parts, strict=True)]
                    first.score += second.score + link.score
                    people.remove(second)
                    continue
                holders = [first]
            if holders:
                person = holders[0]
                if person.parts[part_b] != link.b:
                    person.parts[part_b] = link.b
                    person.score += score_of[link.b] + link.score
            elif limb < STARTING_LIMBS:
                person = _Person()
                person.parts[part_a], person.parts[part_b] = link.a, link.b
                person.score = score_of[link.a] + score_of[link.b] + link.score
                people.append(person)
    return [p for p in people if p.count >= MIN_KEYPOINTS and p.score / p.count >= MIN_MEAN_SCORE]


def decode_poses(heatmaps: np.ndarray, pafs: np.ndarray) -> list[Pose]:
    """The people the maps show, each as 18 points (fractions of the maps' size) or None."""
    height, width = heatmaps.shape[:2]
    peaks = find_peaks(heatmaps)
    links = [
        link_limb(peaks[a], peaks[b], pafs[..., cx], pafs[..., cy])
        for (a, b), (cx, cy) in zip(LIMBS, LIMB_PAFS, strict=True)
    ]
    where = {p.id: (p.x, p.y) for part in peaks for p in part}
    poses: list[Pose] = []
    for person in assemble_people(peaks, links):
        poses.append(
            tuple(
                None if peak < 0 else (where[peak][0] / width, where[peak][1] / height)
                for peak in person.parts
            )
        )
    return poses
