"""Initial schema: predictions, feedback (unique per prediction and annotator), monitor reports.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("weights", sa.String(64), nullable=False),
        sa.Column("predicted", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("prediction_set", sa.JSON, nullable=False),
        sa.Column("set_size", sa.Integer, nullable=False),
        sa.Column("is_ood", sa.Boolean, nullable=False),
        sa.Column("ood_score", sa.Float, nullable=False),
        sa.Column("ood_p_value", sa.Float, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("probs", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False),
        sa.Column("annotator", sa.String(128), nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("audited", sa.Boolean, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("suspect", sa.Boolean, nullable=False),
        sa.Column("proposed", sa.Integer, nullable=False),
        sa.Column("in_set", sa.Boolean, nullable=False),
        sa.UniqueConstraint("prediction_id", "annotator", name="uq_feedback_prediction_annotator"),
    )
    op.create_index("ix_feedback_prediction_id", "feedback", ["prediction_id"])
    op.create_index("ix_feedback_received_at", "feedback", ["received_at"])
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
    )
    op.create_index("ix_reports_created_at", "reports", ["created_at"])


def downgrade() -> None:
    op.drop_table("reports")
    op.drop_table("feedback")
    op.drop_table("predictions")
