"""trigger_states.previous_status: the status a pair had before its last change

The event_detector applies a check with one upsert per pair (INSERT ... ON CONFLICT DO
UPDATE ... RETURNING), and RETURNING yields only the new row: the status it changed from
has to be in the row. NULL until the pair's status first changes.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('trigger_states', sa.Column('previous_status', sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f('ck_trigger_states_previous_status'), 'trigger_states',
        "previous_status IS NULL OR previous_status IN ('OK', 'PROBLEM')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_trigger_states_previous_status'), 'trigger_states', type_='check')
    op.drop_column('trigger_states', 'previous_status')
