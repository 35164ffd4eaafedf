"""Data utilities for text-to-motion work (HumanML3D conventions).

Import the submodules explicitly; this package imports nothing on its own. Among them,
``sopo_ext.data.skeleton``: the 22-joint T2M skeleton, quaternion / 6D rotation helpers, forward
and inverse kinematics, and the 263-d HumanML3D feature layout (features <-> joints, mirroring).
"""
