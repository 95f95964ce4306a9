"""Feedback rows carry their prediction's model and OOD flag; indexes for ranked suspects and recent windows.

``/suspects`` and ``noisewise monitor`` filter feedback by model and OOD flag, rank it by quality and read the
newest rows first. With the model name and the OOD flag on the feedback row itself, each of these is one index
range (no join over the whole table): the ranking index serves the suspects list (ORDER BY quality), the OOD
index the separate OOD list (newest first), the arrival index the monitor's window and the counts (it covers
label, OOD flag and suspect flag, so the counts never touch the table).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("feedback", sa.Column("model_name", sa.String(256), nullable=False, server_default=""))
    op.add_column("feedback", sa.Column("is_ood", sa.Boolean, nullable=False, server_default=sa.false()))
    # existing feedback takes the values of its prediction (every row references one: foreign key)
    op.execute(
        "UPDATE feedback SET "
        "model_name = (SELECT predictions.model_name FROM predictions WHERE predictions.id = feedback.prediction_id), "
        "is_ood = (SELECT predictions.is_ood FROM predictions WHERE predictions.id = feedback.prediction_id)")
    op.create_index("ix_feedback_suspect_rank", "feedback",
                    ["model_name", "suspect", "is_ood", "quality", "received_at", "id"])
    op.create_index("ix_feedback_ood_recent", "feedback", ["model_name", "is_ood", "received_at", "id"])
    op.create_index("ix_feedback_model_received", "feedback",
                    ["model_name", "received_at", "id", "label", "is_ood", "suspect"])
    op.create_index("ix_predictions_model_created", "predictions", ["model_name", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_predictions_model_created", table_name="predictions")
    op.drop_index("ix_feedback_model_received", table_name="feedback")
    op.drop_index("ix_feedback_ood_recent", table_name="feedback")
    op.drop_index("ix_feedback_suspect_rank", table_name="feedback")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("is_ood")
        batch.drop_column("model_name")
