"""trigger pipeline: record the operator and the threshold's scope with each check

A check is published again when its metric.loaded message is redelivered, so it must
carry the operator it was evaluated with, not the trigger's current one (an operator may
edit the trigger in between). The scope tells an operator which threshold row applied.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('trigger_checks', sa.Column('operator', sa.Text(), nullable=True))
    op.add_column('trigger_checks', sa.Column('threshold_scope', sa.Text(), nullable=True))
    # Checks recorded before this revision: their trigger's operator is the best we know.
    op.execute("UPDATE trigger_checks c SET operator = t.operator FROM triggers t WHERE t.id = c.trigger_id")
    op.alter_column('trigger_checks', 'operator', nullable=False)
    op.create_check_constraint(
        op.f('ck_trigger_checks_operator'), 'trigger_checks',
        "operator IN ('lt', 'le', 'gt', 'ge', 'eq', 'ne')",
    )
    op.create_check_constraint(
        op.f('ck_trigger_checks_threshold_scope'), 'trigger_checks',
        "threshold_scope IS NULL OR threshold_scope IN "
        "('offer_affiliate', 'affiliate', 'offer', 'offer_category', 'general')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_trigger_checks_threshold_scope'), 'trigger_checks', type_='check')
    op.drop_constraint(op.f('ck_trigger_checks_operator'), 'trigger_checks', type_='check')
    op.drop_column('trigger_checks', 'threshold_scope')
    op.drop_column('trigger_checks', 'operator')
