"""ix_trigger_states_problem_since: the pairs in PROBLEM, newest first

The console's problems page lists the states in PROBLEM by `since` (newest first) and
counts them. This partial index holds only the PROBLEM rows, in that order, so a page is
a walk of its first rows and the count an index-only scan, however many pairs are OK.
It costs the event_detector little: its usual update (a newer check, same status)
changes no indexed column, so it stays a HOT update; only a status change touches it.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        'ix_trigger_states_problem_since', 'trigger_states',
        [sa.text('since DESC'), 'trigger_id', 'offer_id', 'affiliate_id'],
        postgresql_where=sa.text("status = 'PROBLEM'"),
    )


def downgrade() -> None:
    op.drop_index('ix_trigger_states_problem_since', table_name='trigger_states',
                  postgresql_where=sa.text("status = 'PROBLEM'"))
