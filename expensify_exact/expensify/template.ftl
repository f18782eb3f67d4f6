<#-- expensify-exact export template: renders approved reports as JSON (expensify.md §3, §3.3).
     Every string goes through ?json_string, every number through ?c (no locale grouping), every boolean
     through ?string("true","false"), and every field has a null-safe default. Numbers that may be absent
     render as null so the normalizer can tell "not set" from 0. The "count"/"end" trailer tells a
     complete-but-empty file apart from one that is not rendered yet (§2.3). -->
{"reports":[
<#list reports as report>
{"reportID":"${(report.reportID!"")?json_string}",
"reportName":"${(report.reportName!"")?json_string}",
"policyID":"${(report.policyID!"")?json_string}",
"policyName":"${(report.policyName!"")?json_string}",
"status":"${(report.status!"")?json_string}",
"currency":"${(report.currency!"")?json_string}",
"total":<#if (report.total)?has_content>${report.total?c}<#else>null</#if>,
"created":"${(report.created!"")?json_string}",
"submitted":"${(report.submitted!"")?json_string}",
"approved":"${(report.approved!"")?json_string}",
"reimbursed":"${(report.reimbursed!"")?json_string}",
"accountEmail":"${(report.accountEmail!"")?json_string}",
"managerEmail":"${(report.managerEmail!"")?json_string}",
"transactionList":[
<#list report.transactionList![] as expense>
{"transactionID":"${(expense.transactionID!"")?json_string}",
"amount":<#if (expense.amount)?has_content>${expense.amount?c}<#else>null</#if>,
"currency":"${(expense.currency!"")?json_string}",
"convertedAmount":<#if (expense.convertedAmount)?has_content>${expense.convertedAmount?c}<#else>null</#if>,
"currencyConversionRate":<#if (expense.currencyConversionRate)?has_content>${expense.currencyConversionRate?c}<#else>null</#if>,
"modifiedAmount":<#if (expense.modifiedAmount)?has_content>${expense.modifiedAmount?c}<#else>null</#if>,
"modifiedCreated":"${(expense.modifiedCreated!"")?json_string}",
"modifiedMerchant":"${(expense.modifiedMerchant!"")?json_string}",
"created":"${(expense.created!"")?json_string}",
"merchant":"${(expense.merchant!"")?json_string}",
"category":"${(expense.category!"")?json_string}",
"categoryGlCode":"${(expense.categoryGlCode!"")?json_string}",
"tag":"${(expense.tag!"")?json_string}",
"ntag1":"${(expense.ntag1!"")?json_string}",
"ntag2":"${(expense.ntag2!"")?json_string}",
"ntag3":"${(expense.ntag3!"")?json_string}",
"reimbursable":${(expense.reimbursable!false)?string("true","false")},
"billable":${(expense.billable!false)?string("true","false")},
"taxName":"${(expense.taxName!"")?json_string}",
"taxRate":<#if (expense.taxRate)?has_content>${expense.taxRate?c}<#else>null</#if>,
"taxAmount":<#if (expense.taxAmount)?has_content>${expense.taxAmount?c}<#else>null</#if>,
"taxCode":"${(expense.taxCode!"")?json_string}",
"bank":"${(expense.bank!"")?json_string}",
"cardID":<#if (expense.cardID)?has_content>${expense.cardID?c}<#else>null</#if>,
"cardNumber":"${(expense.cardNumber!"")?json_string}",
"comment":"${(expense.comment!"")?json_string}",
"receiptURL":"${((expense.receiptObject.url)!"")?json_string}"}<#sep>,</#sep>
</#list>
]}<#sep>,</#sep>
</#list>
],"count":${reports?size?c},"end":true}
