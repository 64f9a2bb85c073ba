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
    # The slot used longest ago, found without reading every slot of a big limit.
    op.create_index('ix_hasoffers_call_slots_network_id_used_at', 'hasoffers_call_slots', ['network_id', 'used_at'])


def downgrade() -> None:
    op.drop_index('ix_hasoffers_call_slots_network_id_used_at', table_name='hasoffers_call_slots')
    op.drop_table('hasoffers_call_slots')
