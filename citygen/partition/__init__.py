"""Partition a tile into blocks: visibility-based image assignment, plan.json, sizing estimates."""

from .config import PartitionConfig
from .ground import GroundModel, estimate_ground
from .plan import Block, Grid, TilePlan, block_id
from .planner import plan_tile
from .visibility import Footprints, compute_footprints

__all__ = ["Block", "Footprints", "Grid", "GroundModel", "PartitionConfig", "TilePlan", "block_id",
           "compute_footprints", "estimate_ground", "plan_tile"]
