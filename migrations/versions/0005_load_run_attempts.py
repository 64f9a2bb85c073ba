"""load_runs.attempts and load_runs.notes

attempts counts every start of a run's handler, including those that ended in a crash
or a lost connection (which the broker's retry count cannot see), so a load that never
finishes ends in the dead queue after KPI_RETRY_LIMIT instead of starting again forever.
notes says what a load skipped or cleaned (a record the API sent that could not be
stored as it was) while it still succeeded.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('load_runs', sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('load_runs', sa.Column('notes', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('load_runs', 'notes')
    op.drop_column('load_runs', 'attempts')
