"""OpenPose body pose estimation: the ``openpose`` ControlNets' annotator (issue 16).

- ``network``: CMU's COCO body network in plain torch, loading ``body_pose_model.pth`` with its
  own key names.
- ``decode``: heatmap peaks, PAF line integrals and people from the network's maps.
- ``skeleton``: the 18-keypoint skeleton, its PAF channels and colours, and its drawing.
- ``annotator``: a picture to its people's skeletons, the control image.
"""

from inference.pose.annotator import BodyPoseAnnotator, body_pose_map, detect_poses, load_body_pose_annotator
from inference.pose.network import BodyPoseNet, load_body_pose_net
from inference.pose.skeleton import KEYPOINTS, Pose, draw_poses

__all__ = [
    "KEYPOINTS",
    "BodyPoseAnnotator",
    "BodyPoseNet",
    "Pose",
    "body_pose_map",
    "detect_poses",
    "draw_poses",
    "load_body_pose_annotator",
    "load_body_pose_net",
]
