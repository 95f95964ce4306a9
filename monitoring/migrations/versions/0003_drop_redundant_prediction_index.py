"""Drop the feedback index on ``prediction_id`` alone: the unique index on ``(prediction_id, annotator)`` starts
with the same column and serves every lookup by prediction (and the foreign key), so the second index only
cost each insert one more B-tree to update.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_feedback_prediction_id", table_name="feedback")


def downgrade() -> None:
    op.create_index("ix_feedback_prediction_id", "feedback", ["prediction_id"])
