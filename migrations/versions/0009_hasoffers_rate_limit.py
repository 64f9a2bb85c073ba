"""hasoffers_call_slots: the network's API rate limit, shared by every process

HasOffers allows a network 50 calls in any 10 seconds, whichever process makes them.
One row per allowed call (per network): a call takes the slot whose last use left the
window longest ago (FOR UPDATE SKIP LOCKED) and stamps it when its answer is in.

Revision ID: 0009
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'hasoffers_call_slots',
        sa.Column('network_id', sa.Text(), nullable=False),
        sa.Column('slot', sa.Integer(), nullable=False),
        sa.Column('used_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('network_id', 'slot', name=op.f('pk_hasoffers_call_slots')),
    )


def downgrade() -> None:
    op.drop_table('hasoffers_call_slots')
