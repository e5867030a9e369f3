"""Oracle for the GAE method of OpenRLHF's experience maker (test-only re-implementation):
values and rewards are multiplied by the mask, then the plain recursion runs over every position."""
import torch


class ExperienceMaker:
    @torch.no_grad()
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        if isinstance(values, list):
            pairs = [self.get_advantages_and_returns(v.unsqueeze(0), r.unsqueeze(0), action_mask, gamma, lambd)
                     for v, r in zip(values, rewards)]
            return [a.squeeze(0) for a, _ in pairs], [r.squeeze(0) for _, r in pairs]
        if action_mask is not None:
            values, rewards = action_mask * values, action_mask * rewards
        T = rewards.shape[1]
        carry, cols = 0, []
        for t in reversed(range(T)):
            nxt = values[:, t + 1] if t + 1 < T else 0.0
            carry = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lambd * carry
            cols.append(carry)
        adv = torch.stack(cols[::-1], dim=1)
        return adv.detach(), adv + values


class RemoteExperienceMaker(ExperienceMaker):
    pass
