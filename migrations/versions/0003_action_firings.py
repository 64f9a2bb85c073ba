"""action_firings: an action fires once per episode of its conditions

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'action_firings',
        sa.Column('action_id', sa.Integer(), nullable=False),
        sa.Column('offer_id', sa.Integer(), nullable=False),
        sa.Column('affiliate_id', sa.Integer(), nullable=False),
        sa.Column('episode', sa.Text(), nullable=False),
        sa.Column('trigger_event_id', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['action_id'], ['actions.id'], name=op.f('fk_action_firings_action_id_actions'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['trigger_event_id'], ['trigger_events.id'],
                                name=op.f('fk_action_firings_trigger_event_id_trigger_events'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('action_id', 'offer_id', 'affiliate_id', 'episode', name=op.f('pk_action_firings')),
    )
    op.create_index(op.f('ix_action_firings_trigger_event_id'), 'action_firings', ['trigger_event_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_action_firings_trigger_event_id'), table_name='action_firings')
    op.drop_table('action_firings')
