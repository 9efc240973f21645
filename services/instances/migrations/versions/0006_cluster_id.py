"""instances: the cluster (clusters.v1) whose engine runs each instance; '' for instances made
before the clusters registry, which run on the configured engine (the `main` cluster)

Revision ID: 0006_cluster_id
Revises: 0005_telemetry
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_cluster_id"
down_revision = "0005_telemetry"
branch_labels = None
depends_on = None

S = "instances"


def upgrade() -> None:
    op.add_column(
        "instances", sa.Column("cluster_id", sa.String(64), nullable=False, server_default=""), schema=S
    )


def downgrade() -> None:
    op.drop_column("instances", "cluster_id", schema=S)
