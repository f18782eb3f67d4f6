<#-- expensify-exact reconciliation template (reconciliation dialect, expensify.md §6.3): one JSON object per
     card transaction. The lists nest three deep (cards -> reports -> transactions), so instead of <#sep> every
     object is followed by a comma and the array ends with a null sentinel the client drops. Amounts are raw:
     negative for spend in this dialect (§6.3); the client flips the sign. IDs may be numbers or strings. -->
{"transactions":[
<#list cards as card, reports>
<#list reports as report>
<#list report.transactionList![] as expense>
{"transactionID":"<#if (expense.ID!"")?is_number>${expense.ID?c}<#else>${(expense.ID!"")?json_string}</#if>",
"reportID":<#if (report.ID)?has_content>${report.ID?c}<#else>null</#if>,
"cardID":"<#if (card.ID!"")?is_number>${card.ID?c}<#else>${(card.ID!"")?json_string}</#if>",
"cardName":"${(card.name!"")?json_string}",
"bank":"${(card.bank!"")?json_string}",
"cardOwner":"${(card.owner!"")?json_string}",
"maskedPAN":"${(expense.maskedPAN!"")?json_string}",
"amount":<#if (expense.amount)?has_content>${expense.amount?c}<#else>null</#if>,
"originalAmount":<#if (expense.originalAmount)?has_content>${expense.originalAmount?c}<#else>null</#if>,
"modifiedAmount":<#if (expense.modifiedAmount)?has_content>${expense.modifiedAmount?c}<#else>null</#if>,
"currency":"${(expense.currency!"")?json_string}",
"created":"${(expense.created!"")?json_string}",
"modifiedCreated":"${(expense.modifiedCreated!"")?json_string}",
"posted":"${(expense.posted!"")?json_string}",
"merchant":"${(expense.merchant!"")?json_string}",
"modifiedMerchant":"${(expense.modifiedMerchant!"")?json_string}",
"category":"${(expense.category!"")?json_string}",
"tag":"${(expense.tag!"")?json_string}",
"comment":"${(expense.comment!"")?json_string}"},
</#list>
</#list>
</#list>
null],"end":true}
